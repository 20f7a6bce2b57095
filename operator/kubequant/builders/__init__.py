"""Pure functions from a Model to the manifests of its children (plain dicts, ready to POST), one module
per kind of child: `jobs` (quantize, evaluate, cleanup), `serving` (the vLLM workload and its
companions), `storage` (the artifact claim), on what they share: `meta` (names, hashes, labels) and
`pods` (volumes, resources, scheduling). This package is their one import for the rest of the operator.
"""

from __future__ import annotations

from kubequant.builders.jobs import (  # noqa: F401
    cleanup_job,
    evaluate_command,
    evaluate_job,
    quantize_command,
    quantize_job,
)
from kubequant.builders.meta import (  # noqa: F401
    ANNOTATION_HASH,
    ANNOTATION_RETENTION,
    ARTIFACTS_MOUNT,
    BASE_ENV,
    CONTAINER_SECURITY,
    EVALUATE_CONTAINER,
    FETCH_CONTAINER,
    FETCH_TEXTS_CONTAINER,
    KINDS,
    LABEL_ARTIFACT,
    LABEL_MODEL,
    MANAGED_BY,
    MODEL_DIR_MOUNT,
    OPTIONAL_KINDS,
    POD_SECURITY,
    QUANTIZE_CONTAINER,
    SOURCE_MOUNT,
    SOURCE_SCORES_DIR,
    TEXTS_MOUNT,
    VLLM_PORT,
    api_version,
    artifact_dir,
    artifact_hash,
    cleanup_job_name,
    digest,
    evaluate_job_name,
    evaluation_key,
    hub_text_dir,
    labels,
    model_dir,
    owner_reference,
    quantize_job_name,
    selector,
    source_hash,
)
from kubequant.builders.pods import (  # noqa: F401
    source_location,
)
from kubequant.builders.serving import (  # noqa: F401
    LWS_LEADER_ADDRESS,
    LWS_WORKER_INDEX_LABEL,
    RAY_PORT,
    deployment,
    horizontal_pod_autoscaler,
    inference_pool,
    leader_worker_set,
    multi_node_leader_command,
    multi_node_worker_command,
    optional_kinds,
    pod_disruption_budget,
    server_selector,
    service,
    service_monitor,
    serving_objects,
    vllm_args,
    vllm_serve_args,
    workload_kind,
)
from kubequant.builders.storage import (
    persistent_volume_claim,
)
from kubequant.spec import GPU_RESOURCE, Model  # noqa: F401  (GPU_RESOURCE: what the builders ask GPUs by)


def render(model: Model) -> list[dict]:
    """Every object the operator would create for a new model, for review and GitOps.

    The evaluate Job and the Deployment need the quantize result: they are shown for the
    artifact the spec asks for, with the perplexities left as placeholders."""
    placeholder = {"hash": artifact_hash(model), "path": artifact_dir(model),
                   "baselinePerplexity": "<baseline_ppl>", "fakequantPerplexity": "<fakequant_ppl>"}
    objs = [persistent_volume_claim(model)] if model.spec.storage.create else []
    objs.append(quantize_job(model))
    if model.spec.serving.enabled:
        objs.append(evaluate_job(model, placeholder))
        objs += serving_objects(model, placeholder)
    return objs
