"""Mixed precision: the units that matter most at a finer setting, within a budget on the checkpoint's size.

A unit is what vLLM gives one scheme: the Linears of a decoder layer that read one input (q/k/v, which
vLLM fuses into one module; o; gate/up, fused too; down), and for a mixture of experts the whole experts
block of a layer (vLLM builds it as one fused module whose gate/up and down projections must share a
scheme: compressed_tensors_moe.get_moe_method). Units come from the model's family (quantizer.families),
so a new family brings its units with it.

The plan is chosen from each unit's measured gain (quantizer/sensitivity.py: by default its own effect on
the KL to the source when it alone is quantized at each setting) and its cost, the bytes the finer
setting adds. Units are kept finer greedily by gain per byte until the budget (a share of the uniform
checkpoint's size) is spent; then the model is quantized as planned, in one pass, so that every Linear is
solved against the layers before it as they really are (bench/sensitivity_bench.py measured that weights
moved between separately quantized models make the output worse).

The checkpoint keeps the base scheme in its default config group (targets every Linear) and one group
for the finer units, targeted by a `re:` pattern per unit; unquantized units go in `ignore`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace

from quantizer.contract import DEFAULT_MIXED_SENSITIVITY, MIXED_SENSITIVITIES, UNQUANTIZED, finer_than
from quantizer.errors import InputError
from quantizer.families import Family, matches
from quantizer.gptq import QuantRecipe


@dataclass(frozen=True)
class MixedPrecision:
    """The user's request: `finer` ("bits:group", or "unquantized") for the units that matter most, so that
    the checkpoint grows by at most `budget_percent` of the uniform recipe's size."""

    finer: str
    budget_percent: float
    sensitivity: str = DEFAULT_MIXED_SENSITIVITY

    def finer_recipe(self, base: QuantRecipe) -> QuantRecipe | None:
        """The recipe of a finer unit (None: kept in the source dtype); every other field is the base's."""
        if self.finer == UNQUANTIZED:
            return None
        match = re.fullmatch(r"(\d+):(-?\d+)", self.finer)
        if match is None:
            raise InputError(f"--mixed-finer {self.finer!r}: write bits:group (4:32, 8:128, 4:-1) or {UNQUANTIZED}")
        recipe = replace(base, bits=int(match[1]), group_size=int(match[2]))
        recipe.validate()
        return recipe

    def validate(self, base: QuantRecipe) -> None:
        finer = self.finer_recipe(base)
        if not 0 < self.budget_percent <= 1000:
            raise InputError(f"--mixed-budget {self.budget_percent}: a percentage of the uniform checkpoint's "
                             "size in (0, 1000], for example 5")
        if self.sensitivity not in MIXED_SENSITIVITIES:
            raise InputError(f"--mixed-sensitivity {self.sensitivity!r}: use one of {', '.join(MIXED_SENSITIVITIES)}")
        if finer is not None and not finer_than(finer.bits, finer.group_size, base.bits, base.group_size):
            raise InputError(f"--mixed-finer {self.finer}: not finer than the base recipe "
                             f"({base.bits}:{base.group_size}); choose more bits or a smaller group")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Unit:
    """The Linears (checkpoint names) vLLM gives one scheme, and the compressed-tensors target naming them."""

    name: str  # e.g. "model.layers.3.self_attn.q_proj+k_proj+v_proj"
    linears: tuple[str, ...]
    target: str  # "re:^model\\.layers\\.3\\.self_attn\\.(?:q_proj|k_proj|v_proj)$"
    experts: bool = False


def scheme_units(family: Family, linears: list[str]) -> list[Unit]:
    """The units of a model's quantized Linears (checkpoint names), in the order the layers run them.
    Every Linear must fall in exactly one unit."""
    by_key: dict[tuple[str, int], list[str]] = {}
    patterns_of: dict[tuple[str, int], tuple[str, ...]] = {}
    expert_groups = tuple(p for g in family.groups if "*" in "".join(g) for p in g)
    for name in linears:
        found = re.match(r"^(.*?\.layers\.\d+\.)", name)
        index = next((i for i, g in enumerate(family.groups)
                      if any(matches(name, family.checkpoint_name(p)) for p in g)), None)
        if found is None or index is None:
            raise InputError(f"{name}: in no unit of the {family.name} family's groups")
        experts = "*" in "".join(family.groups[index])
        key = (found[1], -1 if experts else index)
        by_key.setdefault(key, []).append(name)
        patterns_of[key] = expert_groups if experts else family.groups[index]
    units = []
    for (prefix, index), names in by_key.items():
        patterns = [family.checkpoint_name(p) for p in patterns_of[(prefix, index)]]
        alternatives = "|".join(r"\d+".join(re.escape(part) for part in p.split("*")) for p in patterns)
        label = "+".join(p.rsplit(".", 1)[-1] for p in patterns)
        common = patterns[0].rsplit(".", 1)[0] + "." if "." in patterns[0] else ""
        units.append(Unit(name=f"{prefix}{common.replace('.*.', '.')}{label}", linears=tuple(names),
                          target=f"re:^{re.escape(prefix)}(?:{alternatives})$", experts=index == -1))
    return units


def linear_bytes(shape: tuple[int, ...] | list[int], recipe: QuantRecipe | None, source_bytes: float = 2.0) -> float:
    """A Linear's weight bytes in the checkpoint: its codes, 16-bit scales and, on an asymmetric grid,
    packed zero points; unquantized (None), its values at `source_bytes` each."""
    rows, columns = shape
    if recipe is None:
        return rows * columns * source_bytes
    groups = 1 if recipe.group_size == -1 else -(-columns // recipe.group_size)
    zero_points = 0 if recipe.sym else rows * groups * recipe.bits / 8
    return rows * columns * recipe.bits / 8 + rows * groups * 2 + zero_points


@dataclass
class UnitScore:
    unit: Unit
    extra_bytes: float  # what the finer setting adds
    gain: float  # what the sensitivity says the finer setting is worth
    finer: bool = False

    def to_dict(self) -> dict:
        return {"unit": self.unit.name, "linears": len(self.unit.linears), "extra_bytes": int(self.extra_bytes),
                "gain": self.gain, "finer": self.finer}


@dataclass
class Plan:
    """Which Linears are at the finer setting: what the second pass and the writer read."""

    mixed: MixedPrecision
    base: QuantRecipe
    scores: list[UnitScore]
    budget_bytes: float
    seconds: float = 0.0  # the sensitivity pass
    finer_linears: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.finer_linears = frozenset(n for s in self.scores if s.finer for n in s.unit.linears)

    @property
    def finer(self) -> QuantRecipe | None:
        return self.mixed.finer_recipe(self.base)

    def recipe_for(self, linear: str) -> QuantRecipe | None:
        """The recipe of one Linear (checkpoint name); None keeps it in the source dtype."""
        return self.finer if linear in self.finer_linears else self.base

    @property
    def finer_units(self) -> list[Unit]:
        return [s.unit for s in self.scores if s.finer]

    @property
    def extra_bytes(self) -> float:
        return sum(s.extra_bytes for s in self.scores if s.finer)

    def key(self) -> dict:
        """What the checkpoint depends on: the request and the units chosen."""
        return {"mixed_precision": self.mixed.to_dict(), "finer": sorted(u.name for u in self.finer_units)}

    def summary(self) -> dict:
        """For the result (a termination message of at most 4 KiB): what was chosen, not each unit."""
        return {**self.mixed.to_dict(), "budget_bytes": int(self.budget_bytes), "extra_bytes": int(self.extra_bytes),
                "finer_units": len(self.finer_units), "unit_count": len(self.scores),
                "sensitivity_seconds": round(self.seconds, 2)}

    def to_dict(self) -> dict:
        """For the manifest: the summary and every unit's bytes, gain and choice."""
        return {**self.summary(), "units": [s.to_dict() for s in self.scores]}


def choose(mixed: MixedPrecision, base: QuantRecipe, units: list[Unit], shapes: dict[str, tuple[int, int]],
           gains: dict[str, float], uniform_bytes: float, source_bytes: float = 2.0) -> Plan:
    """Keep units finer by gain (`gains`, by unit name: quantizer.sensitivity) per extra byte, greedily,
    while the extra bytes fit the budget (`budget_percent` of `uniform_bytes`, the checkpoint at the base
    recipe). A unit the sensitivity says gains nothing stays at the base recipe. Unquantized experts are
    not offered: vLLM runs a layer's experts as one fused module, quantized or not as a whole, and its
    CPU path serves them only quantized."""
    finer = mixed.finer_recipe(base)
    scores = []
    for unit in units:
        extra = sum(linear_bytes(shapes[n], finer, source_bytes) - linear_bytes(shapes[n], base, source_bytes)
                    for n in unit.linears)
        scores.append(UnitScore(unit, extra, gains.get(unit.name, 0.0)))
    budget = mixed.budget_percent / 100 * uniform_bytes
    spent = 0.0
    for score in sorted(scores, key=lambda s: s.gain / max(s.extra_bytes, 1.0), reverse=True):
        if score.gain <= 0 or not math.isfinite(score.gain) or (finer is None and score.unit.experts):
            continue
        if spent + score.extra_bytes <= budget:
            score.finer = True
            spent += score.extra_bytes
    return Plan(mixed, base, scores, budget)

