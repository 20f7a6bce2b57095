"""Which sensitivity predicts where a finer setting pays: each Linear's output error, or its own effect on the KL.

    python bench/sensitivity_bench.py                                  # both fixtures, 4:128 -> 4:32
    python bench/sensitivity_bench.py --models tiny-llama --coarse 4:128 --fine 4:32 --json out.json

Mixed precision keeps the Linears that matter most at a finer setting within a budget on the checkpoint's
size; which ones depends on how their sensitivity is measured. A unit is what vLLM must give one scheme:
the Linears of a decoder layer that read one input (q/k/v, gate/up, o, down; for a mixture of experts,
each projection of all its experts), from the model's family (quantizer.families). Every model below is
quantized in one pass by the layer pipeline (quantizer.pipeline.quantize_model, the product's default
recipe, the same calibration windows), each Linear at its unit's setting, so that GPTQ solves each unit
against the layers before it as they really are; and scored on held-out text against the source with
the exact KL over the whole vocabulary. Per unit:
  gain     KL(all coarse) - KL(all coarse but this unit fine, quantized so): what keeping it fine is
           worth, the truth the predictors are judged by
  alone    KL(source but this unit's weights from the coarse model) - the same from the fine model: its
           own effect on the output, measured alone (one forward pass per unit and setting)
  error    the sum over its Linears of the relative output error, coarse minus fine, as the quantize
           pass measures it on the calibration activations (free)
  solo     the unit quantized alone: KL(source but this unit at coarse) - KL(source but this unit at fine),
           each solved by GPTQ with Hessians from the source model's own activations (no other unit
           quantized, so no weights solved for another model's stream)
  bytes    the scales the fine setting adds (2 bytes each)
Spearman's rank correlation of `alone` and `error` with `gain` says which predicts; then, at budgets of
extra bytes (shares of what the whole fine setting adds), units are kept fine greedily by each
predictor's value per byte, the mixed model quantized in one pass and scored, beside the uniform settings
(the coarse, the fine and the one between them, 4:64 for 4:128 -> 4:32) and the measured gains' own
choice (hindsight: the best these units allow greedily).

With --predictor-windows N, the first N evaluation windows score the predictors (alone, solo) and the
rest measure the gains and the frontier: a predictor is then judged on text it was not measured on,
as the product's (scored on calibration windows held out of its Hessians) is; without it, both share
the windows, which flatters alone and solo.

With --solo-calibration-windows 8,16,64, `solo` is also scored the product's way, on that many windows
of the calibration text (drawn with the next seed, apart from the Hessians' draw), one
predictor each (`solo-cal8`, ...): how many scored windows the product's plan needs.

Learned on the way: swapping one unit's weights from the fine model into the coarse one makes the KL
worse for every unit of the tiny Llama, because GPTQ with targets from the unquantized model solves
each unit for the inputs its own model's earlier layers give; a mixed model must be quantized as one.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

from quantizer.calibration import load_calibration  # noqa: E402
from quantizer.experts import unfuse_experts  # noqa: E402
from quantizer.families import Family, family_of, matches  # noqa: E402
from quantizer.gptq import QuantRecipe, gptq_quantize, rtn_quantize  # noqa: E402
from quantizer.perplexity import Comparison, EvalWindows, load_evaluation_windows, window_comparison  # noqa: E402
from quantizer.pipeline import SourceModel, _HessianSum, find_decoder_layers, quantize_model  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
MODELS = {"tiny-llama": FIXTURES / "tiny-llama", "tiny-qwen3-moe": FIXTURES / "tiny-qwen3-moe"}
BUDGETS = (0.125, 0.25, 1 / 3, 0.5)
SCALE_BYTES = 2
PREDICTORS = ("alone", "error", "solo")


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


def setting(text: str) -> tuple[int, int]:
    bits, group = text.split(":")
    return int(bits), int(group)


class Quantizer:
    """One model, quantized in one pass with each Linear at its unit's setting; its fake-quant weights
    and its KL against the source on the held-out windows."""

    def __init__(self, model: Path, args, tokenizer):
        self.model, self.args = model, args
        self.calibration = load_calibration(args.calibration, tokenizer, args.samples, args.seq_len,
                                            seed=args.seed).windows
        windows = load_evaluation_windows(args.eval_text, tokenizer, args.seq_len, args.max_windows)
        split = args.predictor_windows
        if split and not 0 < split < len(windows):
            raise SystemExit(f"--predictor-windows {split}: use fewer than the {len(windows)} evaluation windows")
        # The predictors' windows and the measured ones: the same windows unless split.
        self.predictor_windows = windows[:split] if split else windows
        self.windows = windows[split:]
        self.runs = 0

    def run(self, coarse: str, fine: str | None = None, fine_linears: frozenset[str] = frozenset()):
        """(PipelineResult, dequantized weight by Linear name): `fine_linears` at `fine`, the rest at `coarse`."""
        (bits, group), recipe = setting(coarse), QuantRecipe()
        recipe = replace(recipe, bits=bits, group_size=group)
        finer = replace(recipe, bits=setting(fine)[0], group_size=setting(fine)[1]) if fine else recipe

        def quantize(weight, hessian, recipe_, name, **kwargs):
            return gptq_quantize(weight, hessian, finer if name in fine_linears else recipe_, name=name, **kwargs)

        weights: dict[str, torch.Tensor] = {}

        def sink(prefix: str, quantized: dict, _tensors: dict) -> None:
            weights.update({prefix + name: qw.dequantized.detach().float().clone() for name, qw in quantized.items()})

        result = quantize_model(SourceModel.open(self.model), recipe, self.calibration, sink, torch.device("cpu"),
                                eval_windows=self.windows, progress=False, quantize_matrix=quantize)
        self.runs += 1
        return result, weights


def source_model(model: Path, family: Family | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    if family is not None and family.experts is not None:
        _, layers = find_decoder_layers(source, source.config.num_hidden_layers)
        unfuse_experts(layers, family.experts)
    return source


def units(names: list[str], family: Family) -> dict[str, list[str]]:
    """The Linears by unit: `<layer>:<first Linear of its group>` (the Linears one input feeds)."""
    out: dict[str, list[str]] = {}
    for name in names:
        layer = re.search(r"\.layers\.(\d+)\.", name)
        group = next((g for g in family.groups if any(matches(name, p) for p in g)), None)
        if layer is None or group is None:
            continue
        out.setdefault(f"{layer.group(1)}:{group[0].replace('.*', '')}", []).append(name)
    return out


class Scorer:
    """KL and top-1 of a model variant against the source's logits on the held-out windows."""

    def __init__(self, model: nn.Module, windows, batch: int = 8):
        self.model, self.windows, self.batch = model, windows, batch
        self.modules = dict(model.named_modules())
        self.original = {n: m.weight.detach().clone() for n, m in self.modules.items() if isinstance(m, nn.Linear)}
        with torch.no_grad():
            self.reference = [model(ids, use_cache=False).logits for ids, _ in self._batches()]

    def _batches(self):
        for start in range(0, len(self.windows), self.batch):
            yield (self.windows.ids[start: start + self.batch], self.windows.score_from[start: start + self.batch])

    @torch.no_grad()
    def score(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """The source with `weights` (by Linear name) swapped in."""
        for name, w in weights.items():
            self.modules[name].weight.copy_(w)
        try:
            batches = [window_comparison(ref, self.model(ids, use_cache=False).logits, ids, score_from)
                       for ref, (ids, score_from) in zip(self.reference, self._batches(), strict=True)]
        finally:
            for name in weights:
                self.modules[name].weight.copy_(self.original[name])
        c = Comparison.of(batches, self.windows.tokens_scored)
        return {"kl": c.kl, "top1": c.top1, "dppl": c.quantized_ppl - c.baseline_ppl}


@torch.no_grad()
def source_hessians(model: nn.Module, names: list[str], calibration: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """Each Linear's GPTQ Hessian from the source model's own activations on the calibration windows (an
    expert's from the tokens its router sends it)."""
    modules = dict(model.named_modules())
    sums: dict[str, _HessianSum] = {}
    hooks = []
    for name in names:
        linear = modules[name]
        sums[name] = _HessianSum(linear.in_features, torch.device("cpu"))
        hooks.append(linear.register_forward_pre_hook(lambda _m, args, s=sums[name]: s.add(args[0])))
    try:
        for start in range(0, len(calibration), batch):
            model(calibration[start: start + batch], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: s.result() for name, s in sums.items()}


def solo_weights(model: nn.Module, hessians: dict[str, torch.Tensor], names: list[str], text: str) -> dict[str, torch.Tensor]:
    """`names` quantized at setting `text` by GPTQ against the source's Hessians (no tokens: round to nearest)."""
    bits, group = setting(text)
    recipe = replace(QuantRecipe(), bits=bits, group_size=group)
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        weight, hessian = modules[name].weight.detach(), hessians[name]
        qw = gptq_quantize(weight, hessian, recipe, name=name) if hessian.abs().sum() else rtn_quantize(weight, recipe, name)
        out[name] = qw.dequantized.float()
    return out


def extra_bytes(shapes: dict[str, tuple[int, ...]], names: list[str], coarse: int, fine: int) -> int:
    """The scales `names` gain at group size `fine` over `coarse` (the packed codes are the same size)."""
    def groups(k: int, g: int) -> int:
        return 1 if g == -1 else -(-k // g)
    return sum(SCALE_BYTES * shapes[n][0] * (groups(shapes[n][1], fine) - groups(shapes[n][1], coarse)) for n in names)


def run_model(model: Path, args) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    family = family_of(AutoConfig.from_pretrained(model).architectures or [])
    if family is None:
        raise SystemExit(f"{model}: no family entry")
    tokenizer = AutoTokenizer.from_pretrained(model)
    q = Quantizer(model, args, tokenizer)
    coarse, coarse_w = q.run(args.coarse)
    fine, fine_w = q.run(args.fine)
    errors = {role: {s.name: s.relative_error for s in r.linears} for role, r in (("coarse", coarse), ("fine", fine))}
    shapes = {s.name: s.shape for s in coarse.linears}
    g_coarse, g_fine = setting(args.coarse)[1], setting(args.fine)[1]
    scorer = Scorer(source_model(model, family), q.predictor_windows)
    by_unit = units(sorted(shapes), family)
    missing = sorted(set(shapes) - {n for names in by_unit.values() for n in names})
    if missing:
        raise SystemExit(f"{model}: Linears in no unit of the family: {missing[:3]}")

    hessians = source_hessians(scorer.model, sorted(shapes), q.calibration)
    counts = args.solo_calibration_windows
    drawn = load_calibration(args.calibration, tokenizer, max(counts), args.seq_len, seed=args.seed + 1).windows if counts else None
    calibration_scorers = {f"solo-cal{n}": Scorer(scorer.model, EvalWindows(drawn[:n], [1] * n)) for n in counts}
    predictors = (*PREDICTORS, *calibration_scorers)
    rows = []
    for unit, names in by_unit.items():
        mixed, _ = q.run(args.coarse, args.fine, frozenset(names))
        solo = {text: solo_weights(scorer.model, hessians, names, text) for text in (args.coarse, args.fine)}
        rows.append({
            "unit": unit, "linears": len(names), "bytes": extra_bytes(shapes, names, g_coarse, g_fine),
            "gain": coarse.fakequant_kl - mixed.fakequant_kl,
            "alone": scorer.score({n: coarse_w[n] for n in names})["kl"] - scorer.score({n: fine_w[n] for n in names})["kl"],
            "error": sum(errors["coarse"][n] - errors["fine"][n] for n in names),
            **{key: s.score(solo[args.coarse])["kl"] - s.score(solo[args.fine])["kl"]
               for key, s in {"solo": scorer, **calibration_scorers}.items()},
        })
    gains = [r["gain"] for r in rows]
    correlation = {p: spearman([r[p] for r in rows], gains) for p in predictors}
    total = sum(r["bytes"] for r in rows)

    def point(recipe: str, extra: int, result, units_: list[str] | None = None) -> dict[str, Any]:
        out = {"recipe": recipe, "extra_bytes": extra, "kl": result.fakequant_kl, "top1": result.fakequant_top1,
               "dppl": result.fakequant_ppl - result.baseline_ppl}
        return out if units_ is None else {**out, "units": units_}

    frontier = [point(f"uniform {args.coarse}", 0, coarse)]
    if args.between:
        between, _ = q.run(args.between)
        frontier.append(point(f"uniform {args.between}", sum(
            extra_bytes(shapes, names, g_coarse, setting(args.between)[1]) for names in by_unit.values()), between))
    for budget in args.budgets:
        for predictor in (*predictors, "gain"):
            chosen, spent = [], 0
            for r in sorted(rows, key=lambda r: r[predictor] / max(r["bytes"], 1), reverse=True):
                if spent + r["bytes"] <= budget * total and r[predictor] > 0:
                    chosen.append(r["unit"])
                    spent += r["bytes"]
            mixed, _ = q.run(args.coarse, args.fine, frozenset(n for u in chosen for n in by_unit[u]))
            label = "the measured gains (hindsight)" if predictor == "gain" else predictor
            frontier.append(point(f"mixed {budget:.0%} by {label}", spent, mixed, chosen))
    frontier.append(point(f"uniform {args.fine}", total, fine))
    return {"model": model.name, "seed": args.seed, "coarse": args.coarse, "fine": args.fine, "units": rows,
            "predictor_windows": len(q.predictor_windows), "measured_windows": len(q.windows),
            "solo_calibration_windows": counts, "spearman_with_gain": correlation, "frontier": frontier,
            "pipeline_runs": q.runs}


def print_model(result: dict[str, Any]) -> None:
    print(f"\n## {result['model']}: {result['coarse']} -> {result['fine']}")
    rho = result["spearman_with_gain"]
    extra = [p for p in rho if p not in PREDICTORS]
    print("| unit | Linears | extra KiB | gain (KL) | alone (KL) | error (rel.) | solo (KL) |"
          + "".join(f" {p} (KL) |" for p in extra))
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(extra))
    for r in sorted(result["units"], key=lambda r: -r["gain"]):
        print(f"| {r['unit']} | {r['linears']} | {r['bytes'] / 1024:.1f} | {r['gain']:.5f} | {r['alone']:.5f} | "
              f"{r['error']:.5f} | {r['solo']:.5f} |" + "".join(f" {r[p]:.5f} |" for p in extra))
    print("\nSpearman with the gain: " + ", ".join(f"{p} {v:.2f}" for p, v in rho.items()))
    print("\n| recipe | extra KiB | KL | top-1 | ppl increase |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for f in result["frontier"]:
        print(f"| {f['recipe']} | {f['extra_bytes'] / 1024:.1f} | {f['kl']:.5f} | {f['top1']:.2%} | {f['dppl']:+.4f} |"
              + (f" {', '.join(f['units'])}" if f.get("units") else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="fixture names or model folders")
    parser.add_argument("--calibration", type=Path, default=FIXTURES / "text" / "calibration.txt")
    parser.add_argument("--eval-text", type=Path, default=FIXTURES / "text" / "evaluation.txt")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=90)
    parser.add_argument("--predictor-windows", type=int, default=0,
                        help="score the predictors on this many of the evaluation windows, measure on the rest")
    parser.add_argument("--seed", type=int, default=0, help="draws the calibration windows (quantizer.calibration)")
    parser.add_argument("--coarse", default="4:128")
    parser.add_argument("--fine", default="4:32")
    parser.add_argument("--between", default="4:64", help="a uniform setting to compare with (empty: none)")
    parser.add_argument("--budgets", type=lambda v: [float(b) for b in v.split(",")], default=list(BUDGETS),
                        help="shares of the fine setting's extra bytes (default 1/8, 1/4, 1/3, 1/2)")
    parser.add_argument("--solo-calibration-windows", type=lambda v: [int(n) for n in v.split(",") if n], default=[],
                        help="also score solo on this many calibration windows (comma-separated counts), as the product does")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.solo_calibration_windows):
        parser.error("--solo-calibration-windows: counts of at least 1")
    torch.manual_seed(0)
    results = []
    started = time.perf_counter()
    for name in args.models.split(","):
        result = run_model(MODELS.get(name, Path(name)), args)
        print_model(result)
        results.append(result)
    if args.json:
        env = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "seconds": round(time.perf_counter() - started, 1), "argv": sys.argv[1:]}
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
