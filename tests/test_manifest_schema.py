"""A QuantizedModel from a file (`kubequant run`, `kubequant render`) is held to the CRD's schema as the
apiserver holds one under strict field validation: an unknown field, a wrong type or a value out of
bounds is an error naming the field, never a silent default (kubequant/schema.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from kubequant.cli import main as kubequant_main
from kubequant.schema import crd_schema, schema_problems
from kubequant.spec import SpecError, parse_manifest

from tests.test_cluster_admission import _field, _schema_body, schema_cases
from tests.test_operator_crd import INVALID, _base, _set

ROOT = Path(__file__).resolve().parents[1]
CASES = list(schema_cases())


def _named(body: dict) -> dict:
    body = copy.deepcopy(body)
    body["metadata"].update(name="m", namespace="ns")
    return body


def test_the_schema_is_the_crds():
    on_disk = yaml.safe_load((ROOT / "crds" / "quantizedmodels.kubequant.io.yaml").read_text())
    assert crd_schema() == on_disk["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize(("constraint", "path", "value"), CASES, ids=[f"{c}:{'.'.join(p)}" for c, p, _ in CASES])
def test_every_schema_constraint_refuses_a_file_naming_the_field(constraint, path, value):
    """The same corpus the real apiserver refuses (tests/test_cluster_admission.py)."""
    with pytest.raises(SpecError) as refused:
        parse_manifest(_named(_schema_body(constraint, path, value)))
    assert _field(path) in str(refused.value)


@pytest.mark.parametrize(("path", "fix"), [
    ("spec.quantization.groupsize", "did you mean groupSize?"),
    ("spec.quantization.groupSizes", "did you mean groupSize?"),
    ("spec.serving.replica", "did you mean replicas?"),
    ("spec.evaluation.maxKlDivergence", "did you mean maxKLDivergence?"),
    ("spec.unknown", "the fields here are"),
])
def test_an_unknown_field_is_an_error_with_the_fix(path, fix):
    with pytest.raises(SpecError, match=f"{path}: unknown field") as refused:
        parse_manifest(_named(_set(_base(), path, 32)))
    assert fix in str(refused.value)


def test_a_top_level_typo_is_an_error_too():
    body = _named(_base())
    body["specs"] = body.pop("spec")
    assert schema_problems(body)[0].startswith("specs: unknown field (did you mean spec?)")


def test_fractional_bounds_hold_for_integers():
    """The apiserver's schema check truncates a fractional minimum for an integer value (0 passed
    `minimum: 0.001`); the CRD's CEL rules refuse it there, the local check compares exactly."""
    for path, words in (("spec.quantization.dampPercent", "must be at least 0.001, not 0"),
                        ("spec.serving.gpuMemoryUtilization", "must be at least 0.1, not 0")):
        with pytest.raises(SpecError, match=words):
            parse_manifest(_named(_set(_base(), path, 0)))


@pytest.mark.parametrize(("what", "changes", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_every_cel_rule_refuses_a_file_too(what, changes, message):
    body = _base()
    for path, value in changes:
        body = _set(body, path, value)
    if not any(path == "metadata.name" for path, _ in changes):
        body = _named(body)
    with pytest.raises(SpecError):
        parse_manifest(body)


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_every_example_passes(example):
    for body in yaml.safe_load_all((ROOT / "examples" / example).read_text()):
        if body and body.get("kind") == "QuantizedModel":
            assert schema_problems(body) == []


def test_render_and_run_name_every_problem_and_do_nothing(tmp_path, capsys):
    body = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    body["spec"]["quantization"]["groupsize"] = 32
    body["spec"]["quantization"]["dampPercent"] = 0
    manifest = tmp_path / "qm.yaml"
    manifest.write_text(yaml.safe_dump(body))
    assert kubequant_main(["render", "-f", str(manifest)]) == 2
    rendered = capsys.readouterr()
    assert rendered.out == ""
    workdir = tmp_path / "work"
    assert kubequant_main(["run", "-f", str(manifest), "--workdir", str(workdir),
                           "--claim", f"kubequant-data={ROOT / 'tests' / 'fixtures'}"]) == 2
    for err in (rendered.err, capsys.readouterr().err):
        assert "2 problems" in err
        assert "spec.quantization.groupsize: unknown field (did you mean groupSize?)" in err
        assert "spec.quantization.dampPercent must be at least 0.001, not 0" in err
    assert not workdir.exists() or not any(workdir.iterdir())
