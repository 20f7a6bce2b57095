"""What the decision reads and returns: the phases and conditions, the observed children, the actions,
Events and the Decision."""

from __future__ import annotations

from dataclasses import dataclass, field

PENDING, QUANTIZING, EVALUATING, DEPLOYING, READY, FAILED, GATE_FAILED = (
    "Pending", "Quantizing", "Evaluating", "Deploying", "Ready", "Failed", "GateFailed")


PHASES = (PENDING, QUANTIZING, EVALUATING, DEPLOYING, READY, FAILED, GATE_FAILED)


CONDITION_TYPES = ("Quantized", "Evaluated", "GatePassed", "Ready")


# Conditions of the children a spec may ask for: present only when it does.
OPTIONAL_CONDITION_TYPES = ("Autoscaling", "InferencePoolReady")


# What a missing CRD means, for the kinds a cluster may lack (builders.OPTIONAL_KINDS).
MISSING_API = {
    "ServiceMonitor": "the monitoring.coreos.com CRDs (Prometheus Operator) are not installed",
    "LeaderWorkerSet": "the LeaderWorkerSet API (leaderworkerset.x-k8s.io/v1) is not installed: install "
                       "LeaderWorkerSet (https://lws.sigs.k8s.io) or set serving.nodes to 1",
    "InferencePool": "the InferencePool API (inference.networking.k8s.io/v1) is not installed: install the "
                     "Gateway API Inference Extension CRDs or turn serving.inferencePool off",
}


MESSAGE_LIMIT = 1024


# ---- inputs -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Observed:
    """The children as read from the cluster (None: absent)."""

    jobs: dict[str, dict] = field(default_factory=dict)  # every Job labelled with this model, by name
    pods: dict[str, list[dict]] = field(default_factory=dict)  # Pods by the name of their Job
    server_pods: list[dict] = field(default_factory=list)  # the serving workload's Pods (vLLM)
    deployment: dict | None = None
    service: dict | None = None
    pdb: dict | None = None
    service_monitor: dict | None = None
    pvc: dict | None = None
    leader_worker_set: dict | None = None
    hpa: dict | None = None
    inference_pool: dict | None = None
    missing_kinds: frozenset[str] = frozenset()  # of builders.OPTIONAL_KINDS: CRDs the cluster does not serve

    def serving(self) -> dict[str, dict | None]:
        """The serving children by kind, present or None."""
        return {"Deployment": self.deployment, "LeaderWorkerSet": self.leader_worker_set, "Service": self.service,
                "PodDisruptionBudget": self.pdb, "ServiceMonitor": self.service_monitor,
                "HorizontalPodAutoscaler": self.hpa, "InferencePool": self.inference_pool}


# ---- outputs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Create:
    obj: dict


@dataclass(frozen=True)
class Update:
    """Bring an existing object to this content (server-side apply)."""

    obj: dict


@dataclass(frozen=True)
class Delete:
    api_version: str
    kind: str
    name: str


Action = Create | Update | Delete


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    status: dict
    actions: list[Action]
    events: list[Event]
