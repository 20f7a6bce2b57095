"""Mixed precision written by the quantizer (quantizer/mixed.py): units from the family, the plan within its
budget, one checkpoint with a config group per scheme (or the units in `ignore`), read back and served by
vLLM as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quantizer.checkpoint import MANIFEST_FILE, verify_checkpoint
from quantizer.contract import EXIT_BAD_INPUT
from quantizer.errors import InputError
from quantizer.families import LLAMA, MIXTRAL, QWEN3_MOE
from quantizer.formats import FORMATS
from quantizer.gptq import QuantRecipe
from quantizer.mixed import MixedPrecision, choose, linear_bytes, scheme_units
from quantizer.perplexity import load_dequantized_model, load_evaluation_windows, torch_perplexity
from tests.conftest import EVALUATION, quantize
from tests.families import TINY_QWEN3_MOE
from tests.test_evaluate import evaluate_with_vllm

CT = FORMATS["compressed-tensors"]
BASE = QuantRecipe()


def layer_names(prefix: str, inside: list[str]) -> list[str]:
    return [f"{prefix}{name}" for name in inside]


def test_units_are_what_vllm_gives_one_scheme():
    dense = layer_names("model.layers.0.", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    units = scheme_units(LLAMA, dense)
    assert [u.linears for u in units] == [tuple(dense[:3]), (dense[3],), tuple(dense[4:6]), (dense[6],)]
    qkv = units[0]
    assert all(CT.scheme_for({"format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128}},
        "group_1": {"targets": [qkv.target], "weights": {"num_bits": 4, "group_size": 32}}}}, n).group_size == 32
        for n in qkv.linears)
    assert not re.match(qkv.target[3:], "model.layers.0.self_attn.o_proj")
    assert not re.match(qkv.target[3:], "model.layers.10.self_attn.q_proj")  # layer 1 is not layer 10's prefix

    # A layer's experts are one unit: vLLM fuses them into one module whose projections share a scheme.
    experts = [f"model.layers.1.mlp.experts.{e}.{p}" for e in range(3) for p in ("gate_proj", "up_proj", "down_proj")]
    moe = scheme_units(QWEN3_MOE, layer_names("model.layers.1.", ["self_attn.o_proj"]) + experts)
    assert [len(u.linears) for u in moe] == [1, 9] and moe[1].experts and not moe[0].experts
    # vLLM asks for the scheme of expert 0's projections (compressed_tensors_moe.get_moe_method).
    assert all(re.match(moe[1].target[3:], f"model.layers.1.mlp.experts.0.{p}") for p in ("gate_proj", "down_proj"))
    # Checkpoint names, as the family renames them (Mixtral's block_sparse_moe, w1/w3/w2).
    mixtral = scheme_units(MIXTRAL, [f"model.layers.0.block_sparse_moe.experts.{e}.w{i}" for e in range(2) for i in (1, 2, 3)])
    assert len(mixtral) == 1 and re.match(mixtral[0].target[3:], "model.layers.0.block_sparse_moe.experts.1.w2")
    with pytest.raises(InputError, match="in no unit"):
        scheme_units(LLAMA, ["model.layers.0.mlp.fc1"])


def test_the_plan_keeps_the_best_gains_per_byte_within_the_budget():
    names = layer_names("model.layers.0.", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    shapes = {n: (64, 256) for n in names} | {names[-1]: (256, 1024)}
    units = scheme_units(LLAMA, names)
    # By unit: q/k/v, o, gate/up (nothing to gain), down.
    gains = dict(zip([u.name for u in units], [0.003, 0.01, -0.001, 0.02], strict=True))
    mixed = MixedPrecision("4:32", budget_percent=10)
    extra = {u.name: sum(linear_bytes(shapes[n], QuantRecipe(group_size=32)) - linear_bytes(shapes[n], BASE)
                         for n in u.linears) for u in units}
    uniform = 10 * (extra[units[3].name] + extra[units[1].name]) - 1  # not quite room for o and down together
    plan = choose(mixed, BASE, units, shapes, gains, uniform)
    # o_proj's gain per byte is the best; down's does not fit beside it; q/k/v's does; gate/up gain nothing.
    assert [u.name for u in plan.finer_units] == [units[0].name, units[1].name]
    assert plan.extra_bytes <= plan.budget_bytes == pytest.approx(uniform / 10)
    assert plan.recipe_for(names[3]).group_size == 32 and plan.recipe_for(names[-1]) is BASE
    assert plan.to_dict()["units"][1] == {"unit": units[1].name, "linears": 1, "extra_bytes": int(extra[units[1].name]),
                                          "gain": 0.01, "finer": True}
    # Unquantized experts are never offered (vLLM serves a layer's experts quantized or not as a whole,
    # and its CPU path only quantized).
    experts = [f"model.layers.1.mlp.experts.{e}.{p}" for e in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    moe_units = scheme_units(QWEN3_MOE, experts)
    plan = choose(MixedPrecision("unquantized", 100), BASE, moe_units, dict.fromkeys(experts, (64, 64)),
                  {u.name: 1.0 for u in moe_units}, 10**9)
    assert plan.finer_units == [] and plan.finer is None


@pytest.mark.parametrize(("finer", "budget", "message"), [
    ("4:128", 5, "not finer than the base recipe"),
    ("4-32", 5, "write bits:group"),
    ("4:48", 5, "group_size=48 is not supported"),
    ("4:32", 0, "--mixed-budget 0"),
])
def test_a_request_that_cannot_be_planned_is_refused(finer, budget, message):
    with pytest.raises(Exception, match=message):
        MixedPrecision(finer, budget).validate(BASE)


@pytest.mark.parametrize(("extra", "message"), [
    (["--mixed-finer", "4:32"], "needs both --mixed-finer"),
    (["--mixed-finer", "4:32", "--mixed-budget", "5", "--format", "gptq"], "needs --format compressed-tensors"),
    (["--mixed-finer", "4:32", "--mixed-budget", "5", "--method", "rtn"], "use --method gptq"),
])
def test_the_cli_refuses_what_it_cannot_write(tmp_path, extra, message):
    code, result = quantize(tmp_path / "out", *extra)
    assert code == EXIT_BAD_INPUT and message in result["message"], result
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def scales(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            out |= {n.removesuffix(".weight_scale"): tuple(handle.get_slice(n).get_shape())
                    for n in handle.keys() if n.endswith(".weight_scale")}  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("mixed")
    made = {}
    for name, args in {"finer-g32": ["--mixed-finer", "4:32", "--mixed-budget", "1"],
                       "unquantized": ["--mixed-finer", "unquantized", "--mixed-budget", "3"],
                       "by-error": ["--mixed-finer", "4:32", "--mixed-budget", "1", "--mixed-sensitivity", "error"]}.items():
        code, result = quantize(root / name, *args)
        assert code == 0, result
        made[name] = (root / name, result)
    return made


def test_the_checkpoint_holds_each_unit_at_its_planned_scheme(written, checkpoints):
    path, result = written["finer-g32"]
    plan = json.loads((path / MANIFEST_FILE).read_text())["mixed_precision"]
    assert {k: v for k, v in plan.items() if k != "units"} == result["mixed_precision"]  # the result's summary
    finer = {u["unit"] for u in plan["units"] if u["finer"]}
    assert 0 < len(finer) == plan["finer_units"] < len(plan["units"]) and plan["extra_bytes"] <= plan["budget_bytes"]
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    assert set(qconfig["kubequant"]["mixed_precision"]["finer_units"]) == finer
    shapes = scales(path)
    fine_linears = {n for n in shapes if CT.scheme_for(qconfig, n).group_size == 32}
    units = {u.name: u for u in scheme_units(LLAMA, sorted(shapes))}
    assert fine_linears == {n for u in finer for n in units[u].linears}
    for name, shape in shapes.items():
        assert shape[1] == (384 if "down_proj" in name else 128) // (32 if name in fine_linears else 128), name
    assert verify_checkpoint(path)["quantized_linears"] == 28
    # The bytes the plan counted are the bytes the checkpoint added over uniform 4:128 (headers aside).
    added = result["size_after_bytes"] - checkpoints["gptq-g128"][1]["size_after_bytes"]
    assert abs(added - plan["extra_bytes"]) < 4096, (added, plan["extra_bytes"])
    # The quantize pass measured the model it wrote: our reference reads the checkpoint to the same perplexity.
    from transformers import AutoTokenizer

    windows = load_evaluation_windows(EVALUATION, AutoTokenizer.from_pretrained(path), 256, 24)
    assert torch_perplexity(load_dequantized_model(path), windows).ppl == pytest.approx(result["fakequant_ppl"], rel=1e-3)


def test_the_output_error_sensitivity_plans_too(written):
    path, result = written["by-error"]
    assert result["mixed_precision"]["sensitivity"] == "error" and result["mixed_precision"]["finer_units"] > 0
    units = json.loads((path / MANIFEST_FILE).read_text())["mixed_precision"]["units"]
    assert all(u["gain"] > 0 for u in units if u["finer"]) and verify_checkpoint(path)


def test_unquantized_units_are_kept_in_the_source_dtype_and_ignored(written):
    path, result = written["unquantized"]
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    kept = {u["unit"] for u in json.loads((path / MANIFEST_FILE).read_text())["mixed_precision"]["units"] if u["finer"]}
    assert kept and list(qconfig["config_groups"]) == ["group_0"]
    ignored = [n for n in qconfig["ignore"] if n != "lm_head"]
    assert {u.name for u in scheme_units(LLAMA, ignored)} == kept
    assert result["quantized_linears"] == 28 - len(ignored)
    source = load_dequantized_model(path)
    from safetensors.torch import load_file

    original = load_file(Path("tests/fixtures/tiny-llama/model.safetensors"))
    modules = dict(source.named_modules())
    for name in ignored:
        assert torch.equal(modules[name].weight.float(), original[f"{name}.weight"].float()), name
    assert verify_checkpoint(path)["quantized_linears"] == 28 - len(ignored)


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("mixed-moe") / "moe"
    code, result = quantize(path, "--mixed-finer", "4:32", "--mixed-budget", "2", model=TINY_QWEN3_MOE)
    assert code == 0, result
    return path, result


def test_a_mixture_of_experts_plans_its_expert_blocks_whole(moe):
    path, _ = moe
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    shapes = scales(path)
    per_layer = []
    for layer in range(4):
        experts = {CT.scheme_for(qconfig, n).group_size for n in shapes if n.startswith(f"model.layers.{layer}.mlp.experts.")}
        assert len(experts) == 1, (layer, experts)  # every projection of every expert: one scheme
        per_layer.append(experts.pop())
    assert verify_checkpoint(path)
    # The serving test below means something only if some experts are finer than others.
    assert set(per_layer) == {32, 128}, per_layer


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["finer-g32", "unquantized", "moe"])
def test_vllm_serves_the_written_mixed_checkpoint_as_our_reference_reads_it(written, moe, name, tmp_path):
    """The MoE checkpoint has some layers' experts at 4:32 and others' at 4:128: vLLM's fused experts take
    each layer's scheme from its own config group."""
    path, result = moe if name == "moe" else written[name]
    code, evaluated = evaluate_with_vllm(path, tmp_path, "--baseline-ppl", repr(result["baseline_ppl"]),
                                         "--fakequant-ppl", repr(result["fakequant_ppl"]))
    assert code == 0, evaluated
    assert abs(evaluated["served_ppl"] / result["fakequant_ppl"] - 1) < 0.001, evaluated


def test_the_streamed_solo_gain_is_the_units_own_effect_on_the_kl():
    """solo_gains streams the layers once; its number for a unit must be what the whole source model gives
    with that unit alone quantized against the source's own Hessians, at each setting."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantizer.calibration import load_calibration
    from quantizer.gptq import gptq_quantize
    from quantizer.perplexity import Comparison, window_comparison
    from quantizer.pipeline import SourceModel
    from quantizer.sensitivity import solo_gains
    from tests.conftest import CALIBRATION, TINY_MODEL

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    calibration = load_calibration(CALIBRATION, tokenizer, 8, 128, 0).windows
    windows = load_evaluation_windows(EVALUATION, tokenizer, 128, 6)
    finer = replace(BASE, group_size=32)
    gains = solo_gains(SourceModel.open(TINY_MODEL), BASE, finer, lambda names: scheme_units(LLAMA, names),
                       calibration, windows, torch.device("cpu"), batch_size=4, progress=False)
    assert len(gains) == 16

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    unit = "model.layers.1.mlp.down_proj"
    down = modules[unit]
    inputs = []
    hook = down.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(-1, down.in_features)))
    with torch.no_grad():
        model(calibration, use_cache=False)
        hook.remove()
        x = torch.cat(inputs).float()
        hessian = 2 * x.T @ x / x.shape[0]
        reference = model(windows.ids, use_cache=False).logits
        source_weight = down.weight.detach().clone()

        def kl(recipe) -> float:
            down.weight.copy_(gptq_quantize(source_weight, hessian, recipe, name=unit).dequantized)
            logits = model(windows.ids, use_cache=False).logits
            down.weight.copy_(source_weight)
            return Comparison.of([window_comparison(reference, logits, windows.ids, windows.score_from)],
                                 windows.tokens_scored).kl

        expected = kl(BASE) - kl(finer)
    assert expected > 0
    # Equal up to float summation order (batches, threads: a difference of two KLs of about 0.01 each),
    # and nearer to this unit's gain than to any other unit's.
    assert gains[unit] == pytest.approx(expected, rel=0.02)
    assert min(gains, key=lambda u: abs(gains[u] - expected)) == unit
