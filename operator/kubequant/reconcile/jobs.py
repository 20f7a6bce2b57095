"""Reading a Job: its outcome from its status and its Pods' termination messages, and whether its Pod can run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from kubequant.reconcile.outcomes import MESSAGE_LIMIT
from quantizer.contract import decode

# ---- reading Jobs -------------------------------------------------------------------------------

def redact(text: str) -> str:
    """Termination messages go to status and Events: never let a token through, keep them short."""
    text = re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


@dataclass(frozen=True)
class JobOutcome:
    state: str  # missing, pending, waiting (its Pod cannot run: reason, message), running, succeeded, failed
    result: dict | None = None  # the main container's termination message, decoded
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    seconds: float | None = None  # from the Job's start to its completion or failure


def _duration(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _terminations(pods: list[dict]) -> list[tuple[str, dict]]:
    """(container name, terminated state) of every container of the Pods, newest Pod first."""
    out = []
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "", reverse=True):
        status = pod.get("status") or {}
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            for state_key in ("state", "lastState"):
                terminated = (cs.get(state_key) or {}).get("terminated")
                if terminated:
                    out.append((cs.get("name", ""), terminated))
    return out


def job_outcome(job: dict | None, pods: list[dict], container: str) -> JobOutcome:
    if job is None:
        return JobOutcome("missing")
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    terminations = _terminations(pods)

    if "Complete" in conditions or "SuccessCriteriaMet" in conditions or (status.get("succeeded") or 0) > 0:
        seconds = _duration(status.get("startTime"), status.get("completionTime"))
        for name, terminated in terminations:
            if name == container and terminated.get("exitCode") == 0:
                return JobOutcome("succeeded", result=decode(terminated.get("message")), seconds=seconds)
        return JobOutcome("succeeded", seconds=seconds)

    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed:
        seconds = _duration(status.get("startTime"), failed.get("lastTransitionTime"))
        for name, terminated in terminations:
            code = terminated.get("exitCode")
            if code in (None, 0):
                continue
            result = decode(terminated.get("message"))
            if terminated.get("reason") == "OOMKilled":
                reason, message = "OOMKilled", f"container {name} ran out of memory (exit code {code}); raise its memory limit"
            elif result and result.get("reason"):
                reason, message = str(result["reason"]), str(result.get("message", ""))
            else:
                reason = terminated.get("reason") or "Error"
                message = f"container {name} exited with code {code}"
                if terminated.get("message"):
                    message += f": {terminated['message']}"
            if name != container:
                message = f"{name}: {message}"
            return JobOutcome("failed", result=result if name == container else None, reason=reason,
                              message=redact(message), exit_code=code, seconds=seconds)
        return JobOutcome("failed", reason=failed.get("reason") or "JobFailed",
                          message=redact(failed.get("message") or "the Job failed"), seconds=seconds)

    stuck = pod_waiting(pods)
    if stuck:
        return JobOutcome("waiting", reason=stuck[0], message=redact(stuck[1]))
    if (status.get("active") or 0) > 0 or (status.get("ready") or 0) > 0:
        return JobOutcome("running")
    return JobOutcome("pending")


# A container that waits for one of these waits until someone acts (a missing Secret or image, a
# registry that refuses): nothing runs, and the model must say so rather than "running".
STUCK_CONTAINER_REASONS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})


def pod_waiting(pods: list[dict]) -> tuple[str, str] | None:
    """(reason, message) when the newest Pod cannot run: the scheduler cannot place it (a claim that is
    missing or unbound, no node with the GPUs, a quota, a taint: PodScheduled is False with the
    scheduler's words), or a container cannot start. None while it runs, starts or ended."""
    if not pods:
        return None
    pod = max(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "")
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return condition.get("reason") or "Unschedulable", condition.get("message") or "the Pod cannot be scheduled"
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_CONTAINER_REASONS:
            return waiting["reason"], f"container {cs.get('name')}: {waiting.get('message') or waiting['reason']}"
    return None
