"""spec.quantization.mixedPrecision: the units that matter most at a finer setting, within a budget on size.

The quantize Job measures each unit's sensitivity, keeps the best gains per byte at the finer setting
until the checkpoint has grown by maxSizeIncreasePercent over the uniform recipe's, and writes one
compressed-tensors checkpoint with a config group per scheme (quantizer/mixed.py). This module is the
spec side: the fields, their checks (each CEL rule of the CRD has its twin here) and the quantizer's
command-line flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantizer.contract import (
    COMPRESSED_TENSORS_FORMAT,
    DEFAULT_MIXED_SENSITIVITY,
    MIXED_SENSITIVITIES,
    SERVABLE_BITS,
    SERVABLE_GROUP_SIZES,
    UNQUANTIZED,
    finer_than,
)

FIELDS = ("finer", "maxSizeIncreasePercent", "sensitivity")
FINER_FIELDS = ("bits", "groupSize", "unquantized")
MAX_SIZE_INCREASE_PERCENT = 1000


@dataclass(frozen=True)
class MixedPrecision:
    max_size_increase_percent: float
    finer_bits: int | None = None  # None: the recipe's
    finer_group_size: int | None = None
    unquantized: bool = False  # the finer units kept in the source dtype
    sensitivity: str = DEFAULT_MIXED_SENSITIVITY

    def finer(self, bits: int, group_size: int) -> str:
        """The quantizer's --mixed-finer: "bits:group" over the recipe's (bits, group_size), or unquantized."""
        if self.unquantized:
            return UNQUANTIZED
        return f"{self.finer_bits or bits}:{self.finer_group_size or group_size}"

    def cli_args(self, bits: int, group_size: int) -> list[str]:
        return ["--mixed-finer", self.finer(bits, group_size),
                "--mixed-budget", repr(float(self.max_size_increase_percent)),
                "--mixed-sensitivity", self.sensitivity]

    def identity(self, bits: int, group_size: int) -> dict[str, Any]:
        """What the artifact depends on (its hash)."""
        return {"finer": self.finer(bits, group_size), "maxSizeIncreasePercent": float(self.max_size_increase_percent),
                "sensitivity": self.sensitivity}


def from_spec(raw: Any) -> MixedPrecision | None:
    """The fields as written (checked by `problems`); None when absent."""
    if raw is None or isinstance(raw, MixedPrecision):
        return raw
    finer = raw.get("finer") or {}
    return MixedPrecision(
        max_size_increase_percent=raw.get("maxSizeIncreasePercent"),
        finer_bits=finer.get("bits"), finer_group_size=finer.get("groupSize"),
        unquantized=finer.get("unquantized", False),
        sensitivity=raw.get("sensitivity", DEFAULT_MIXED_SENSITIVITY),
    )


def problems(raw: Any, where: str, bits: int, group_size: int, fmt: str) -> list[str]:
    """Every problem of a mixedPrecision object under the recipe (bits, group_size, format) it refines."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        return [f"{where} must be an object such as {{finer: {{groupSize: 32}}, maxSizeIncreasePercent: 5}}"]
    out = [f"{where}.{k}: not a field of mixedPrecision ({', '.join(FIELDS)})" for k in sorted(set(raw) - set(FIELDS))]
    finer = raw.get("finer")
    if not isinstance(finer, dict):
        out.append(f"{where}.finer is required: the finer setting, such as {{groupSize: 32}}, {{bits: 8}} or "
                   "{unquantized: true}")
        finer = {}
    out += [f"{where}.finer.{k}: not a field of finer ({', '.join(FINER_FIELDS)})"
            for k in sorted(set(finer) - set(FINER_FIELDS))]
    budget = raw.get("maxSizeIncreasePercent")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= MAX_SIZE_INCREASE_PERCENT:
        out.append(f"{where}.maxSizeIncreasePercent must be a number above 0 and at most "
                   f"{MAX_SIZE_INCREASE_PERCENT}: how much larger than the uniform recipe's checkpoint it may be, "
                   "in percent (for example 5)")
    if raw.get("sensitivity", DEFAULT_MIXED_SENSITIVITY) not in MIXED_SENSITIVITIES:
        out.append(f"{where}.sensitivity must be one of {', '.join(MIXED_SENSITIVITIES)}")
    if fmt != COMPRESSED_TENSORS_FORMAT:
        out.append(f"{where} needs format {COMPRESSED_TENSORS_FORMAT}: the gptq layout holds one scheme for the "
                   f"whole checkpoint; set format {COMPRESSED_TENSORS_FORMAT} or drop mixedPrecision")
    if not isinstance(finer.get("unquantized", False), bool):
        out.append(f"{where}.finer.unquantized must be true or false")
    if finer.get("unquantized") is True:
        if "bits" in finer or "groupSize" in finer:
            out.append(f"{where}.finer: unquantized true keeps the units in the source dtype; drop bits and groupSize")
        return out
    if "bits" not in finer and "groupSize" not in finer:
        out.append(f"{where}.finer must set bits or groupSize (over the recipe's), or unquantized true")
        return out
    fine_bits, fine_group = finer.get("bits", bits), finer.get("groupSize", group_size)
    if fine_bits not in SERVABLE_BITS or fine_group not in SERVABLE_GROUP_SIZES:
        out.append(f"{where}.finer must make a setting vLLM serves: bits {' or '.join(map(str, SERVABLE_BITS))}, "
                   f"groupSize {', '.join(map(str, SERVABLE_GROUP_SIZES))}")
    elif not finer_than(fine_bits, fine_group, bits, group_size):
        out.append(f"{where}.finer ({fine_bits}-bit, group {fine_group}) is not finer than the recipe ({bits}-bit, "
                   f"group {group_size}): give more bits or a smaller groupSize")
    return out
