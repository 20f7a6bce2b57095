"""The recipe candidates' search (spec.quantization.candidates): which one the stages work on, what
status says of each, and the Events of their verdicts.

The search is a function of the status like the rest of the decision: a candidate whose evaluation
(by its key) failed the gate is passed over, and the first one not passed over is the one the
stages quantize, gate and serve. A restart, a resync or a spec edit that keeps a candidate's recipe
finds its records by hash and key, and measures nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubequant import builders
from kubequant.candidates import Candidate, expand
from kubequant.reconcile.outcomes import FAILED, PENDING, QUANTIZING, Event
from kubequant.reconcile.records import record_for, status_records
from kubequant.spec import Model

PASSED, REJECTED, UNTRIED = "Passed", "GateFailed", "Untried"


@dataclass(frozen=True)
class Search:
    """The candidates of one model, their keys, and the one the stages work on (`current`)."""

    candidates: list[Candidate]
    hashes: list[str]  # artifact hash of each
    keys: list[str]  # evaluation key of each
    current: int

    @property
    def listed(self) -> bool:
        """Whether the spec lists candidates (status then reports them)."""
        return len(self.candidates) > 1

    @property
    def model(self) -> Model:
        return self.candidates[self.current].model

    @property
    def name(self) -> str:
        return self.candidates[self.current].name

    def job_names(self) -> tuple[str, ...]:
        """Every candidate's Jobs: an earlier candidate's are kept, not deleted as another spec's."""
        return tuple(name for c in self.candidates
                     for name in (builders.quantize_job_name(c.model), builders.evaluate_job_name(c.model)))


def search(model: Model, old: dict) -> Search:
    """The candidates in order, and the first whose gate has not failed (the last when all have)."""
    candidates = expand(model)
    hashes = [builders.artifact_hash(c.model) for c in candidates]
    keys = [builders.evaluation_key(c.model) for c in candidates]
    rejected = {r["key"] for r in status_records(old, "evaluation") if r.get("key") and r.get("passed") is False}
    current = next((i for i, key in enumerate(keys) if key not in rejected), len(candidates) - 1)
    return Search(candidates, hashes, keys, current)


def entries(s: Search, old: dict, status: dict, phase: str) -> list[dict]:
    """status.candidates: each candidate with its records and state; the current one's from this decision."""
    artifacts = [status.get("artifact") or {}, *status_records(old, "artifact")]
    evaluations = [status.get("evaluation") or {}, *status_records(old, "evaluation")]
    out = []
    for i, c in enumerate(s.candidates):
        entry: dict = {"name": c.name, "recipe": dict(c.overrides), "artifactHash": s.hashes[i],
                       "evaluationKey": s.keys[i]}
        artifact, evaluation = record_for("hash", s.hashes[i], artifacts), record_for("key", s.keys[i], evaluations)
        if artifact:
            entry["artifact"] = artifact
        if evaluation:
            entry["evaluation"] = evaluation
            entry["state"] = PASSED if evaluation.get("passed") else REJECTED
        elif i == s.current:
            entry["state"] = phase if phase in (PENDING, QUANTIZING, FAILED) or not artifact else "Evaluating"
        else:
            entry["state"] = UNTRIED
        out.append(entry)
    return out


def _numbers(entry: dict) -> str:
    """A candidate's size and gate numbers, for messages."""
    artifact, evaluation = entry.get("artifact") or {}, entry.get("evaluation") or {}
    parts = []
    if artifact.get("sizeAfterBytes"):
        parts.append(f"{artifact['sizeAfterBytes'] / 2**20:.1f} MiB")
    if (evaluation.get("klDivergence") or {}).get("mean") is not None:
        parts.append(f"KL {evaluation['klDivergence']['mean']:.4g}")
    if evaluation.get("topTokenAgreement") is not None:
        parts.append(f"top-1 {evaluation['topTokenAgreement']:.2%}")
    if evaluation.get("servedPerplexity") is not None:
        parts.append(f"perplexity {evaluation['servedPerplexity']:.4g}")
    return ", ".join(parts)


def none_passed(rows: list[dict]) -> str:
    """GateFailed's message when every candidate failed the gate: each with its numbers and reason."""
    return "no candidate passed the gate: " + "; ".join(
        f"{e['name']} ({_numbers(e)}): {(e.get('evaluation') or {}).get('reason')}" for e in rows)


def all_rejected(rows: list[dict]) -> bool:
    return bool(rows) and all(e["state"] == REJECTED for e in rows)


def events(old: dict, rows: list[dict]) -> list[Event]:
    """One Event per candidate verdict, when it is new (not on every reconcile, nor after a restart)."""
    before = {(e.get("name"), e.get("evaluationKey")): e.get("state") for e in old.get("candidates") or []}
    out = []
    for i, e in enumerate(rows):
        if e["state"] not in (PASSED, REJECTED) or before.get((e["name"], e["evaluationKey"])) == e["state"]:
            continue
        reason = (e.get("evaluation") or {}).get("reason")
        if e["state"] == PASSED:
            out.append(Event("Normal", "CandidatePassed", f"candidate {e['name']} passed the gate ({_numbers(e)})"))
            continue
        after = next((r["name"] for r in rows[i + 1:] if r["state"] != REJECTED), None)
        nxt = f"; trying {after} next" if after else ""
        out.append(Event("Warning", "CandidateRejected",
                         f"candidate {e['name']} failed the gate ({reason}; {_numbers(e)}){nxt}"))
    return out

