"""The artifact claim, when the spec asks the operator to create it."""

from __future__ import annotations

from typing import Any

from kubequant.builders.meta import ANNOTATION_RETENTION, api_version, object_metadata
from kubequant.spec import Model


def persistent_volume_claim(model: Model) -> dict:
    """The artifact claim, when the spec asks for one. Never owned: Retain must outlive the model."""
    st = model.spec.storage
    spec: dict[str, Any] = {"accessModes": [st.access_mode], "resources": {"requests": {"storage": st.size}}}
    if st.storage_class_name:
        spec["storageClassName"] = st.storage_class_name
    meta = object_metadata(model, st.claim_name, "storage", owned=False)
    meta["annotations"] = {ANNOTATION_RETENTION: st.retention_policy}
    return {"apiVersion": api_version("PersistentVolumeClaim"), "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}
