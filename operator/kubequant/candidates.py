"""Recipe candidates (`spec.quantization.candidates`): the recipes tried in order until one passes the gate.

The spec's own recipe is the first candidate; each entry of `candidates` overrides some of its recipe
fields (not the calibration, the device or the Job's resources) and is the next one tried. Each
candidate is a whole Model of its own (`expand`): its artifact hash, its Jobs' names and their command
lines come from the functions that build a single recipe's, so a candidate's artifact is the same
artifact the plain spec of that recipe would make, and found again by its hash.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from kubequant import mixed_precision

# The recipe fields a candidate may override: spec name -> Quantization's field.
RECIPE_FIELDS = {
    "bits": "bits", "groupSize": "group_size", "actOrder": "act_order", "symmetric": "symmetric",
    "dampPercent": "damp_percent", "scaleSearch": "scale_search", "format": "format", "fullRange": "full_range",
    "refineSweeps": "refine_sweeps", "groupAwareOrder": "group_aware_order", "sourceTargets": "source_targets",
    "expertCalibration": "expert_calibration", "mixedPrecision": "mixed_precision",
}
# Fields whose spec form is an object: how a candidate's override becomes Quantization's value.
FROM_SPEC = {"mixedPrecision": mixed_precision.from_spec}
MAX_CANDIDATES = 8  # the CRD's maxItems: each candidate may cost a quantization and an evaluation
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH = 30


@dataclass(frozen=True)
class CandidateRecipe:
    """One entry of spec.quantization.candidates, as written: an optional name and the fields it overrides."""

    overrides: tuple[tuple[str, Any], ...]  # (spec name, value), in RECIPE_FIELDS order
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.overrides)


@dataclass(frozen=True)
class Candidate:
    """A recipe to try: its position (0 is the spec's own recipe), its name and the Model it makes."""

    index: int
    name: str
    overrides: dict[str, Any]
    model: Any  # kubequant.spec.Model, whose quantization is this recipe (and has no candidates)


def label(bits: int, group_size: int, mixed: bool = False) -> str:
    """The default name of a recipe: w4-g128, w8-channel, w4-g128-mixed (with mixed precision)."""
    return f"w{bits}-" + ("channel" if group_size == -1 else f"g{group_size}") + ("-mixed" if mixed else "")


@dataclass(frozen=True)
class Recipe:
    """A candidate's whole recipe: spec.quantization with its overrides applied (and no candidates)."""

    index: int
    name: str
    overrides: dict[str, Any]
    quantization: Any  # kubequant.spec.Quantization


def expand_recipes(q: Any) -> list[Recipe]:
    """The spec's recipe, then each candidate over it (unnamed ones named by label(), made unique by
    their position)."""
    recipes = [CandidateRecipe(()), *list(q.candidates)]
    out: list[Recipe] = []
    taken: set[str] = {r.name for r in recipes if r.name}
    for index, recipe in enumerate(recipes):
        fields = {RECIPE_FIELDS[k]: FROM_SPEC.get(k, lambda v: v)(v) for k, v in recipe.overrides}
        quantization = dataclasses.replace(q, candidates=(), **fields)
        name = recipe.name or label(quantization.bits, quantization.group_size,
                                    quantization.mixed_precision is not None)
        if not recipe.name and name in taken:
            name = f"{name}-{index}"
        taken.add(name)
        out.append(Recipe(index, name, recipe.as_dict(), quantization))
    return out


def expand(model: Any) -> list[Candidate]:
    """expand_recipes() as Models: each candidate's Model differs from `model` in its recipe only."""
    return [Candidate(r.index, r.name, r.overrides,
                      dataclasses.replace(model, spec=dataclasses.replace(model.spec, quantization=r.quantization)))
            for r in expand_recipes(model.spec.quantization)]


def duplicates(q: Any) -> list[str]:
    """A candidate that repeats an earlier recipe would only be measured again: say which."""
    seen: dict[tuple, int] = {}
    problems = []
    for r in expand_recipes(q):
        identity = tuple(getattr(r.quantization, f) for f in RECIPE_FIELDS.values())
        if identity in seen:
            problems.append(f"{where(r.index)} is the same recipe as {where(seen[identity])}: drop it, "
                            "or change a field")
        seen.setdefault(identity, r.index)
    return problems


def where(index: int) -> str:
    """The spec path of a candidate, for messages."""
    return "spec.quantization" if index == 0 else f"spec.quantization.candidates[{index - 1}]"


def parse(raw: Any) -> tuple[list[tuple[int, dict, str | None]], list[str]]:
    """spec.quantization.candidates as written -> ([(position, overrides, name)], problems). Only the
    shape is checked here; each merged recipe is checked as a whole recipe by the spec's parser."""
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], ["spec.quantization.candidates must be a list of partial recipes, such as [{groupSize: 32}]"]
    problems: list[str] = []
    if len(raw) > MAX_CANDIDATES:
        problems.append(f"spec.quantization.candidates has {len(raw)} entries; at most {MAX_CANDIDATES} "
                        "(each may cost a quantization and an evaluation)")
    out = []
    for i, entry in enumerate(raw[:MAX_CANDIDATES]):
        at = f"spec.quantization.candidates[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{at} must be an object of recipe fields, such as {{groupSize: 32}}")
            continue
        unknown = sorted(set(entry) - set(RECIPE_FIELDS) - {"name"})
        if unknown:
            problems.append(f"{at}.{unknown[0]}: a candidate overrides only recipe fields "
                            f"({', '.join(RECIPE_FIELDS)}) and may have a name")
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not NAME_RE.match(name) or len(name) > MAX_NAME_LENGTH):
            problems.append(f"{at}.name must be at most {MAX_NAME_LENGTH} lowercase letters, digits and '-', "
                            "starting and ending with a letter or digit")
        overrides = {k: entry[k] for k in RECIPE_FIELDS if k in entry}
        if not overrides and not unknown:
            problems.append(f"{at} overrides no recipe field: give at least one of {', '.join(RECIPE_FIELDS)}")
        out.append((i, overrides, name))
    return out, problems


def reword(problem: str, index: int, overrides: dict) -> str:
    """A problem of a candidate's merged recipe, as the spec's parser words it for spec.quantization,
    moved to the candidate: its own field when it overrides it, else the candidate as a whole."""
    for key in overrides:
        prefix = f"spec.quantization.{key}"
        if problem.startswith(prefix) and not problem[len(prefix):len(prefix) + 1].isalnum():
            return where(index + 1) + problem[len("spec.quantization"):]
    return f"{where(index + 1)} (over the recipe it overrides): {problem}"
