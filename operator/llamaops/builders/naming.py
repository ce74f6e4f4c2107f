"""Deterministic names and labels of the objects LlamaOps creates.

Names are derived from the owner alone, so a repeated reconcile finds the
child it made before instead of making another. Children never copy the
owner's labels: GitOps tools track by label (Argo CD's
app.kubernetes.io/instance) and would prune copies as their own.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from llamaops.api.constants import (
    ANNOTATION_OWNER,
    ANNOTATION_RUN_HASH,
    ANNOTATION_SPEC_HASH,
    API_VERSION,
    LABEL_COMPONENT,
    LABEL_FINETUNE,
    LABEL_MANAGED_BY,
    LABEL_SERVE,
    MANAGED_BY,
)

__all__ = ["ANNOTATION_OWNER", "ANNOTATION_RUN_HASH", "ANNOTATION_SPEC_HASH", "LABEL_COMPONENT", "LABEL_FINETUNE",
           "LABEL_SERVE", "MANAGED_BY", "child_name", "controller_of", "controller_ref", "dns_label", "label_value",
           "labels",
           "metadata",
           "owner_reference"]
MAX_LABEL = 63
# Indexed Job pods are named and hostnamed <job>-<index>: leave room for the index.
MAX_JOB_NAME = 56


def _fit(base: str, suffix: str, limit: int) -> str:
    name = f"{base}-{suffix}" if suffix else base
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    keep = limit - len(digest) - 1 - (len(suffix) + 1 if suffix else 0)
    head = base[:keep].rstrip("-.")
    return f"{head}-{digest}-{suffix}" if suffix else f"{head}-{digest}"


def child_name(owner: str, suffix: str, limit: int = MAX_LABEL) -> str:
    """`<owner>-<suffix>`, shortened with a hash when it would exceed `limit`."""
    return _fit(owner, suffix, limit)


def dns_label(name: str) -> str:
    """`name` as a DNS-1035 label start (what a Service's name, and a pod hostname, must be): lowercase letters,
    digits and '-', a letter first. Object names may start with a digit or hold dots (`8b-lora`,
    `llama3.1-lora`); such a name is mapped, with a hash of it, so that two names never map to one."""
    safe = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not safe[:1].isalpha():
        safe = f"r-{safe}"
    if safe == name:
        return name
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def label_value(value: str) -> str:
    return _fit(value, "", MAX_LABEL)


def labels(kind_label: str, owner: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "llamaops",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_COMPONENT: component,
        kind_label: label_value(owner),
    }


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def controller_ref(body: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    """The controller owner reference of `body` to a `kind` object, if it has one."""
    for ref in body["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == kind and ref.get("controller"):
            return ref
    return None


def controller_of(body: Mapping[str, Any], kind: str) -> str | None:
    """The name of the `kind` object that controls `body`, if any."""
    ref = controller_ref(body, kind)
    return ref["name"] if ref is not None else None


def metadata(name: str, namespace: str, owner_kind: str, owner: str, uid: str, lbls: dict[str, str],
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(lbls),
                            "ownerReferences": [owner_reference(owner_kind, owner, uid)]}
    ann = {ANNOTATION_OWNER: f"{owner_kind}/{owner}", **(annotations or {})}
    meta["annotations"] = ann
    return meta
