"""spec.quantization.mixedPrecision on the operator's side: the spec, the quantize Job's command line, the
artifact's identity, candidates that add it, and the preflight over every group size."""

from __future__ import annotations

import pytest
from kubequant import builders, mixed_precision
from kubequant.candidates import expand
from kubequant.mixed_precision import MixedPrecision
from kubequant.reconcile.checks import preflight
from kubequant.spec import SpecError, parse_model

from quantizer.contract import COMPRESSED_TENSORS_FORMAT, SERVABLE_BITS, SERVABLE_GROUP_SIZES, finer_than
from quantizer.errors import InputError
from tests.operator_support.objects import example, with_spec

MIXED = {"finer": {"groupSize": 32}, "maxSizeIncreasePercent": 5}


def _container_args(model) -> list[str]:
    job = builders.quantize_job(model)
    container = job["spec"]["template"]["spec"]["containers"][0]
    return [*container.get("command", []), *container.get("args", [])]


def test_the_quantize_job_plans_mixed_precision_and_the_artifact_says_so():
    plain = parse_model(example())
    model = parse_model(with_spec(example(), "quantization.mixedPrecision", MIXED))
    assert model.spec.quantization.mixed_precision == MixedPrecision(5, finer_group_size=32)
    args = _container_args(model)
    at = args.index("--mixed-finer")
    assert args[at: at + 6] == ["--mixed-finer", "4:32", "--mixed-budget", "5.0", "--mixed-sensitivity", "solo"]
    assert "--mixed-finer" not in _container_args(plain)
    # Another artifact, and another again for another budget or finer setting.
    hashes = {builders.artifact_hash(m) for m in (plain, model, *(
        parse_model(with_spec(example(), "quantization.mixedPrecision", mp)) for mp in (
            {**MIXED, "maxSizeIncreasePercent": 10}, {**MIXED, "finer": {"bits": 8}},
            {**MIXED, "finer": {"unquantized": True}})))}
    assert len(hashes) == 5
    # bits 8 over the recipe's group; unquantized as the quantizer spells it.
    eight = parse_model(with_spec(example(), "quantization.mixedPrecision", {**MIXED, "finer": {"bits": 8}}))
    assert eight.spec.quantization.mixed_precision.finer(4, 128) == "8:128"
    assert MixedPrecision(5, unquantized=True).finer(4, 128) == "unquantized"


def test_a_candidate_may_add_mixed_precision():
    model = parse_model(with_spec(example(), "quantization.candidates", [{"mixedPrecision": MIXED}, {"groupSize": 32}]))
    found = expand(model)
    assert [c.name for c in found] == ["w4-g128", "w4-g128-mixed", "w4-g32"]
    assert found[1].overrides == {"mixedPrecision": MIXED}  # status shows it as written
    # The candidate's artifact is the one the plain spec with that mixed precision makes.
    plain = parse_model(with_spec(example(), "quantization.mixedPrecision", MIXED))
    assert builders.artifact_hash(found[1].model) == builders.artifact_hash(plain)
    assert found[2].model.spec.quantization.mixed_precision is None


@pytest.mark.parametrize(("mixed", "problem"), [
    ({"maxSizeIncreasePercent": 5}, "spec.quantization.mixedPrecision.finer is required"),
    ({"finer": {"groupSize": 32}}, "spec.quantization.mixedPrecision.maxSizeIncreasePercent must be a number above 0"),
    ({**MIXED, "budget": 5}, "spec.quantization.mixedPrecision.budget: not a field of mixedPrecision"),
    ({**MIXED, "finer": {"groupsize": 32}}, "spec.quantization.mixedPrecision.finer.groupsize: not a field of finer"),
    ({**MIXED, "finer": {}}, "spec.quantization.mixedPrecision.finer must set bits or groupSize"),
    ({**MIXED, "finer": {"groupSize": 256}}, "spec.quantization.mixedPrecision.finer must make a setting vLLM serves"),
    ({**MIXED, "finer": {"groupSize": -1}}, "is not finer than the recipe (4-bit, group 128)"),
    ({**MIXED, "sensitivity": "gut"}, "spec.quantization.mixedPrecision.sensitivity must be one of solo, error"),
    ({**MIXED, "finer": {"unquantized": "yes"}}, "spec.quantization.mixedPrecision.finer.unquantized must be true or false"),
])
def test_a_bad_mixed_precision_is_refused_naming_the_field(mixed, problem):
    with pytest.raises(SpecError) as refused:
        parse_model(with_spec(example(), "quantization.mixedPrecision", mixed))
    assert problem in str(refused.value)


def test_a_candidate_mixed_in_the_gptq_layout_is_refused_naming_it():
    body = with_spec(example(), "quantization.candidates", [{"format": "gptq", "mixedPrecision": MIXED}])
    with pytest.raises(SpecError, match=r"spec.quantization.candidates\[0\].mixedPrecision needs format "
                                        "compressed-tensors"):
        parse_model(body)
    # The recipe's mixed precision is checked under a candidate's format too.
    body = with_spec(with_spec(example(), "quantization.mixedPrecision", MIXED), "quantization.candidates",
                     [{"format": "gptq"}])
    with pytest.raises(SpecError, match=r"candidates\[0\] \(over the recipe it overrides\): "
                                        r"spec.quantization.mixedPrecision needs format"):
        parse_model(body)


def test_the_preflight_checks_every_group_size_of_a_mixed_artifact():
    # 2 GPUs: 5504 columns of 11008 per GPU, 43 whole groups of 128 and 172 of 32.
    artifact = {"groupSize": 128, "rowParallelInFeatures": [4096, 11008]}
    assert preflight(artifact, 2) is None
    assert preflight({**artifact, "groupSizes": [32, 128]}, 2) is None
    # 4 GPUs: 2752 columns, 86 whole groups of 32 but 21.5 of 128. A 4:32 recipe whose finer units are
    # 8:128 fits by its own group and not by the finer units' one: refused.
    base = {"groupSize": 32, "rowParallelInFeatures": [4096, 11008]}
    assert preflight(base, 4) is None
    refused = preflight({**base, "groupSizes": [32, 128]}, 4)
    assert refused is not None and "whole groups of 32 and 128" in refused and "11008 -> 2752" in refused
    # The larger group decides: 96 columns per GPU are whole groups of 32, not of 64.
    refused = preflight({"groupSize": 32, "groupSizes": [32, 64], "rowParallelInFeatures": [192]}, 2)
    assert refused is not None and "use tensorParallelSize 1 or a smaller groupSize" in refused


@pytest.mark.parametrize("base", [(b, g) for b in SERVABLE_BITS for g in SERVABLE_GROUP_SIZES])
def test_the_spec_and_the_quantizer_agree_on_what_is_finer(base):
    """One ordering (contract.finer_than) decides on both sides: every servable finer setting the spec
    refuses as not finer, the quantizer's --mixed-finer refuses too, and the other way round."""
    from quantizer.gptq import QuantRecipe
    from quantizer.mixed import MixedPrecision as QuantizerMixedPrecision

    bits, group = base
    for fine_bits in SERVABLE_BITS:
        for fine_group in SERVABLE_GROUP_SIZES:
            raw = {"finer": {"bits": fine_bits, "groupSize": fine_group}, "maxSizeIncreasePercent": 5}
            spec_refuses = any("is not finer" in p for p in mixed_precision.problems(raw, "m", bits, group,
                                                                                     COMPRESSED_TENSORS_FORMAT))
            try:
                QuantizerMixedPrecision(f"{fine_bits}:{fine_group}", 5).validate(QuantRecipe(bits=bits, group_size=group))
                quantizer_refuses = False
            except InputError as exc:
                assert "not finer" in str(exc)
                quantizer_refuses = True
            assert spec_refuses == quantizer_refuses == (not finer_than(fine_bits, fine_group, bits, group))


@pytest.mark.parametrize(("fine", "base", "finer"), [
    ((4, 32), (4, 128), True), ((4, 128), (4, 128), False), ((4, 128), (4, 32), False),
    ((4, 128), (4, -1), True), ((4, -1), (4, 128), False), ((8, -1), (4, 32), True), ((4, 32), (8, 128), False),
])
def test_finer_means_more_bits_then_a_smaller_group(fine, base, finer):
    assert finer_than(*fine, *base) is finer
