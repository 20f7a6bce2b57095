"""Recipe candidates (spec.quantization.candidates): the spec, and the search as the pure decision makes it.

The scenarios play the cluster with the reconciler's Sim: a candidate whose gate fails hands over to
the next one, what serves stays until one passes, and nothing measured is measured again after a
restart or a spec edit.
"""

from __future__ import annotations

import copy

import pytest
from kubequant import builders
from kubequant.candidates import expand
from kubequant.reconcile import Create, Delete, decide
from kubequant.spec import SpecError, parse_model

from tests.operator_support.objects import PASSED, QUANTIZE_RESULT, REGRESSED, example, with_spec, with_status
from tests.test_operator_reconcile import NOW, Sim

CANDIDATES = [{"groupSize": 64}, {"groupSize": 32, "name": "fine"}]


def _body(candidates: list | None = None) -> dict:
    return with_spec(example(), "quantization.candidates", CANDIDATES if candidates is None else candidates)


def _jobs(sim: Sim, component: str) -> dict[str, dict]:
    return {name: job for (kind, name), job in sim.objs.items()
            if kind == "Job" and job["metadata"]["labels"]["app.kubernetes.io/component"] == component}


def _finish_newest(sim: Sim, component: str, state: str, result: dict) -> str:
    """Finish the one Job of `component` that has not finished yet; returns its name."""
    [name] = [n for n, job in _jobs(sim, component).items() if not job.get("status")]
    job = sim.objs[("Job", name)]
    sim.objs[("Job", name)] = with_status(job, state)
    from tests.operator_support.objects import pod
    sim.pods[name] = [pod(job, component, exit_code=0 if state == "succeeded" else 3, result=result)]
    return name


def _states(status: dict) -> list[tuple[str, str]]:
    return [(c["name"], c["state"]) for c in status["candidates"]]


# ---- the spec -------------------------------------------------------------------------------------

def test_candidates_are_the_spec_recipe_then_each_override_over_it():
    model = parse_model(_body([{"groupSize": 64}, {"bits": 8, "name": "eight"}, {"groupSize": 64, "dampPercent": 2}]))
    found = [(c.name, c.overrides, c.model.spec.quantization.bits, c.model.spec.quantization.group_size)
             for c in expand(model)]
    # Each entry overrides the spec's recipe, not the entry before it.
    assert found == [("w4-g128", {}, 4, 128), ("w4-g64", {"groupSize": 64}, 4, 64), ("eight", {"bits": 8}, 8, 128),
                     ("w4-g64-3", {"groupSize": 64, "dampPercent": 2}, 4, 64)]
    # A candidate's artifact is the one the plain spec of that recipe makes: found again by its hash.
    plain = parse_model(with_spec(example(), "quantization.groupSize", 64))
    assert builders.artifact_hash(expand(model)[1].model) == builders.artifact_hash(plain)
    assert builders.artifact_hash(model) == builders.artifact_hash(parse_model(example()))


@pytest.mark.parametrize(("candidates", "problem"), [
    ([{"groupSize": 33}], "spec.quantization.candidates[0].groupSize must be"),
    ([{"groupsize": 32}], "spec.quantization.candidates[0].groupsize: a candidate overrides only recipe fields"),
    ([{"calibration": {}}], "spec.quantization.candidates[0].calibration: a candidate overrides only recipe fields"),
    ([{}], "spec.quantization.candidates[0] overrides no recipe field"),
    ([{"name": "only-a-name"}], "spec.quantization.candidates[0] overrides no recipe field"),
    ([{"groupSize": 128}], "spec.quantization.candidates[0] is the same recipe as spec.quantization"),
    ([{"groupSize": 64}, {"groupSize": 64, "name": "again"}],
     "spec.quantization.candidates[1] is the same recipe as spec.quantization.candidates[0]"),
    ([{"groupSize": 64, "name": "x"}, {"groupSize": 32, "name": "x"}], "has the name 'x' twice"),
    ([{"groupSize": 64, "name": "Not_A_Name"}], "spec.quantization.candidates[0].name must be"),
    ([{"bits": 3}], "spec.serving.enabled needs a recipe vLLM serves on GPUs (spec.quantization.candidates[0])"),
    ([{"bits": "4x"}], "spec.quantization.candidates[0].bits must be of type int"),
    ([{"groupSize": 64}] * 9, "at most 8"),
    ("groupSize: 32", "spec.quantization.candidates must be a list"),
])
def test_a_bad_candidate_is_refused_naming_it(candidates, problem):
    with pytest.raises(SpecError) as refused:
        parse_model(_body(candidates))
    assert problem in str(refused.value)


def test_candidates_need_the_gate():
    with pytest.raises(SpecError, match="candidates are tried until one passes the gate, which runs only when"):
        parse_model(with_spec(_body(), "serving.enabled", False))


def test_a_candidate_is_checked_with_the_fields_it_does_not_override():
    body = with_spec(_body([{"groupAwareOrder": True}]), "quantization.actOrder", False)
    with pytest.raises(SpecError, match=r"candidates\[0\]\.groupAwareOrder is a kind of act-order"):
        parse_model(body)
    body = with_spec(_body([{"actOrder": False}]), "quantization.groupAwareOrder", True)
    with pytest.raises(SpecError, match=r"candidates\[0\] \(over the recipe it overrides\): spec.quantization"
                                        r".groupAwareOrder is a kind of act-order"):
        parse_model(body)


# ---- the search ---------------------------------------------------------------------------------

def test_a_failed_gate_moves_on_to_the_next_candidate_and_the_first_that_passes_serves():
    sim = Sim(_body())
    sim.step()
    first = _finish_newest(sim, "quantize", "succeeded", QUANTIZE_RESULT)
    sim.step()
    _finish_newest(sim, "evaluate", "failed", REGRESSED)
    decision = sim.step()
    status = decision.status
    assert _states(status) == [("w4-g128", "GateFailed"), ("w4-g64", "Pending"), ("fine", "Untried")]
    assert status["phase"] == "Pending" and status["candidate"] == "w4-g64"
    assert status["message"].startswith("candidate w4-g64 (2 of 3): ")
    assert status["artifactHash"] == status["candidates"][1]["artifactHash"]
    assert [e.reason for e in decision.events if e.reason.startswith("Candidate")] == ["CandidateRejected"]
    [rejected] = [e for e in decision.events if e.reason == "CandidateRejected"]
    assert "w4-g128 failed the gate (PerplexityRegression" in rejected.message and "trying w4-g64 next" in rejected.message
    # The next candidate's quantize Job, with its own recipe; the first one's Jobs stay.
    created = [a.obj for a in decision.actions if isinstance(a, Create) and a.obj["kind"] == "Job"]
    assert [j["metadata"]["name"] for j in created] == [builders.quantize_job_name(expand(sim.model)[1].model)]
    command = created[0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--group-size") + 1] == "64"
    assert not [a for a in decision.actions if isinstance(a, Delete)] and ("Job", first) in sim.objs
    assert "Deployment" not in {k for k, _ in sim.objs}  # nothing passed yet: nothing serves

    _finish_newest(sim, "quantize", "succeeded", QUANTIZE_RESULT)
    sim.step()
    _finish_newest(sim, "evaluate", "succeeded", PASSED)
    decision = sim.step()
    assert _states(decision.status) == [("w4-g128", "GateFailed"), ("w4-g64", "Passed"), ("fine", "Untried")]
    assert [e.message for e in decision.events if e.reason == "CandidatePassed"] == \
        ["candidate w4-g64 passed the gate (5340.6 MiB, KL 0.021, top-1 93.00%, perplexity 13)"]
    deployment = sim.objs[("Deployment", sim.model.name)]
    assert builders.artifact_dir(sim.model, decision.status["candidates"][1]["artifactHash"]) in str(deployment)
    assert decision.status["serving"]["candidate"] == "w4-g64"
    sim.deployment_available()
    decision = sim.step()
    assert decision.status["phase"] == "Ready" and not [e for e in decision.events if e.reason.startswith("Candidate")]
    # A resync decides the same and measures nothing.
    assert not sim.step().actions


def _all_failed(sim: Sim) -> None:
    sim.step()
    for _ in range(3):
        _finish_newest(sim, "quantize", "succeeded", QUANTIZE_RESULT)
        sim.step()
        _finish_newest(sim, "evaluate", "failed", REGRESSED)
        sim.step()


def test_when_no_candidate_passes_gate_failed_lists_them_all():
    sim = Sim(_body())
    _all_failed(sim)
    status = sim.step().status
    assert status["phase"] == "GateFailed"
    assert _states(status) == [("w4-g128", "GateFailed"), ("w4-g64", "GateFailed"), ("fine", "GateFailed")]
    for name in ("w4-g128", "w4-g64", "fine"):
        assert f"{name} (5340.6 MiB, perplexity 14.2): PerplexityRegression" in status["message"]
    gate = {c["type"]: c for c in status["conditions"]}["GatePassed"]
    assert gate["status"] == "False" and gate["message"] == status["message"]
    assert len(_jobs(sim, "quantize")) == len(_jobs(sim, "evaluate")) == 3


def test_a_restart_or_lost_jobs_measure_nothing_again():
    sim = Sim(_body())
    _all_failed(sim)
    # The Jobs are gone (a TTL, an operator restart on another cluster state): the status has it all.
    sim.objs = {k: v for k, v in sim.objs.items() if k[0] != "Job"}
    sim.pods = {}
    decision = decide(copy.deepcopy(sim.body), sim.observed(), NOW)
    assert decision.status["phase"] == "GateFailed" and not decision.actions


def test_a_spec_edit_reuses_what_was_measured():
    sim = Sim(_body())
    _all_failed(sim)
    # A looser gate: every artifact is reused, each evaluated again (its key changed), the first first.
    sim.set_spec("evaluation.maxPerplexityRatio", 1.2)
    decision = sim.step()
    created = [a.obj["metadata"]["labels"]["app.kubernetes.io/component"] for a in decision.actions
               if isinstance(a, Create) and a.obj["kind"] == "Job"]
    assert created == ["evaluate"] and decision.status["candidate"] == "w4-g128"
    assert [c["state"] for c in decision.status["candidates"]] == ["Evaluating", "Untried", "Untried"]
    assert all("artifact" in c for c in decision.status["candidates"])  # found by hash: not quantized again
    # Dropping a candidate and reordering the rest keeps their records.
    sim.set_spec("quantization.candidates", [CANDIDATES[1]])
    status = sim.step().status
    assert [c["name"] for c in status["candidates"]] == ["w4-g128", "fine"]
    assert all("artifact" in c for c in status["candidates"])


def test_what_serves_stays_until_a_candidate_passes():
    sim = Sim(example())
    sim.to_ready()
    served = sim.body["status"]["serving"]["artifact"]["hash"]
    # A stricter gate that the serving recipe fails, and a candidate to try next.
    sim.set_spec("evaluation.maxKLDivergence", 0.01)
    sim.set_spec("quantization.candidates", [{"groupSize": 64}])
    sim.step()
    _finish_newest(sim, "evaluate", "failed", REGRESSED)
    status = sim.step().status
    assert _states(status) == [("w4-g128", "GateFailed"), ("w4-g64", "Pending")]
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert ready["status"] == "True" and ready["reason"] == "ServingPreviousArtifact"
    assert status["serving"]["artifact"]["hash"] == served


def test_each_candidate_measured_has_its_metrics_and_none_outlives_it():
    from kubequant import metrics
    from prometheus_client import REGISTRY

    def sample(name: str, candidate: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"namespace": "ml", "model": "m", "candidate": candidate})

    sim = Sim(_body())
    _all_failed(sim)
    metrics.record("ml", "m", {}, sim.body["status"])
    assert [sample("kubequant_candidate_passed", n) for n in ("w4-g128", "w4-g64", "fine")] == [0, 0, 0]
    assert sample("kubequant_candidate_size_bytes", "fine") == QUANTIZE_RESULT["size_after_bytes"]
    status = copy.deepcopy(sim.body["status"])
    status["candidates"] = status["candidates"][:1]  # a spec edit dropped two
    metrics.record("ml", "m", {}, status)
    assert sample("kubequant_candidate_passed", "w4-g128") == 0 and sample("kubequant_candidate_passed", "fine") is None
    metrics.forget("ml", "m")
    assert sample("kubequant_candidate_passed", "w4-g128") is None
