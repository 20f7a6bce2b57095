"""bench/frontier_bench.py's reading of its points: the line mixed precision is judged against, and the plan
read back from the checkpoint's manifest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import frontier_bench as bench


def point(name: str, size: int, kl: float | None, exact: float) -> dict:
    return {"name": name, "size_bytes": size, "kl": kl, "top1": None if kl is None else 0.9, "served_ppl": None,
            "fakequant_kl": exact}


def test_mixed_is_judged_against_the_served_uniform_settings_around_it(capsys):
    """An unserved 8-bit point (a CPU run) is in the table but not on the line; the mixed point halfway
    between 4:128 and 4:64 is compared with their mean, by vLLM's KL and by the exact one."""
    result = {"model": "m", "seed": 0, "points": [
        point("uniform 4:128", 1000, 0.010, 0.020),
        point("mixed 50% (solo)", 1050, 0.0081, 0.0150),
        point("uniform 4:64", 1100, 0.008, 0.010),
        point("uniform 8:128", 2000, None, 0.0001),
        point("source", 4000, 0.0, 0.0),
    ]}
    bench.print_model(result)
    out = capsys.readouterr().out
    assert "| uniform 8:128 | 2.0 | not served | - | - | 0.0001 |" in out
    assert "mixed 50% (solo): KL 0.0081 vs 0.009 for uniform settings at its size (0.90x); exact 0.015 vs 0.015 (1.00x)" in out


def test_the_svg_leaves_unserved_points_out(tmp_path):
    result = {"model": "m", "seed": 0, "points": [
        point("uniform 4:128", 1000, 0.010, 0.020), point("uniform 4:32", 1100, 0.008, 0.010),
        point("uniform 8:128", 2000, None, 0.0001)]}
    bench.svg([result], tmp_path / "f.svg")
    text = (tmp_path / "f.svg").read_text()
    assert text.count("<circle") == 2 and "8:128" not in text


def test_the_mixed_plan_comes_from_the_manifest(tmp_path):
    units = [{"unit": "model.layers.0.mlp.down_proj", "finer": True, "gain": 2e-5},
             {"unit": "model.layers.0.self_attn.o_proj", "finer": False, "gain": 1e-6}]
    (tmp_path / bench.MANIFEST_FILE).write_text(json.dumps({"mixed_precision": {"finer": "4:32", "units": units}}))
    assert bench.mixed_plan(tmp_path) == {"finer": "4:32", "finer_unit_names": ["model.layers.0.mlp.down_proj"]}
    (tmp_path / bench.MANIFEST_FILE).write_text(json.dumps({"mixed_precision": None}))
    assert bench.mixed_plan(tmp_path) is None
