"""Reading the run's spec and working out where its output goes."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from llamaops.api import API_VERSION, FineTuneSpec, LlamaFineTune
from llamaops.api.contract import (
    ENV_NAME,
    ENV_NAMESPACE,
    ENV_OUTPUT_DIR,
    ENV_REPORT,
    ENV_SPEC,
    SPEC_PATH,
    output_subpath,
    pvc_path,
    spec_hash,
)
from llamaops.api.manifests import load_file
from llamaops.api.validation import validate_finetune

from llamaops_trainer.errors import BadConfig


@dataclass(frozen=True)
class RunConfig:
    spec: FineTuneSpec
    name: str | None
    namespace: str | None
    output_dir: Path
    spec_hash: str
    # Set when the adapter goes to S3: output_dir is then a local staging area.
    s3_output: Any = None
    report: str | None = None  # the run's report ConfigMap (progress and adapter), named by the operator


def spec_path_from_env() -> str:
    return os.environ.get(ENV_SPEC, SPEC_PATH)


def _pick_document(docs: list[dict[str, Any]], path: str, name: str | None) -> dict[str, Any]:
    if not docs:
        raise BadConfig("spec", f"{path} holds no YAML document")
    finetunes = [d for d in docs if isinstance(d, dict) and d.get("kind") == "LlamaFineTune"]
    if len(docs) == 1:
        return docs[0]
    if name:
        finetunes = [d for d in finetunes if (d.get("metadata") or {}).get("name") == name] or finetunes
    if len(finetunes) == 1:
        return finetunes[0]
    raise BadConfig("spec", f"{path} holds {len(docs)} documents; expected one LlamaFineTune")


def to_manifest(doc: dict[str, Any], name: str | None, namespace: str | None) -> dict[str, Any]:
    """A full LlamaFineTune manifest from a manifest (possibly read back from the API server) or a bare spec."""
    if not isinstance(doc, dict):
        raise BadConfig("spec", f"expected a mapping, got {type(doc).__name__}")
    if "spec" in doc or "kind" in doc:
        if doc.get("kind", "LlamaFineTune") != "LlamaFineTune":
            raise BadConfig("kind", f"expected LlamaFineTune, got {doc.get('kind')!r}")
        meta = doc.get("metadata") or {}
        # Only what the models read: an object read back from the server carries
        # managedFields, uid and a status the trainer has no business validating.
        manifest = {
            "apiVersion": doc.get("apiVersion", API_VERSION),
            "kind": "LlamaFineTune",
            "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "annotations") if k in meta},
            "spec": doc.get("spec"),
        }
    else:
        manifest = {"apiVersion": API_VERSION, "kind": "LlamaFineTune", "metadata": {}, "spec": doc}
    if name:
        manifest["metadata"]["name"] = name
    if namespace:
        manifest["metadata"]["namespace"] = namespace
    manifest["metadata"].setdefault("name", "local")
    return manifest


def parse_spec(doc: dict[str, Any], name: str | None = None, namespace: str | None = None) -> LlamaFineTune:
    """Validates like the operator does; the first error becomes a one-line BadConfig naming its field."""
    result = validate_finetune(to_manifest(doc, name, namespace))
    if result.errors:
        first = result.errors[0]
        more = f" (and {len(result.errors) - 1} more problem(s))" if len(result.errors) > 1 else ""
        raise BadConfig(first.field, first.message + more)
    assert isinstance(result.obj, LlamaFineTune)
    return result.obj


def load(spec_path: str | None = None, output_dir: str | None = None) -> RunConfig:
    path = spec_path or spec_path_from_env()
    if not Path(path).is_file():
        raise BadConfig("spec", f"no spec file at {path} (set --spec or ${ENV_SPEC})")
    try:
        docs = load_file(path)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BadConfig("spec", f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    env_name = os.environ.get(ENV_NAME) or None
    env_namespace = os.environ.get(ENV_NAMESPACE) or None
    lft = parse_spec(_pick_document(docs, path, env_name), env_name, env_namespace)
    # Name/namespace/report address the report; only the operator's environment names the
    # object to patch (a manifest's own metadata may describe another cluster).
    name, namespace = env_name, env_namespace
    spec = lft.spec
    out = output_dir or os.environ.get(ENV_OUTPUT_DIR)
    ns_for_path = namespace or lft.metadata.namespace
    name_for_path = name or lft.metadata.name
    s3_output = None
    if out is None and spec.output.pvc is not None:
        pvc = spec.output.pvc
        if pvc.path is None and not (ns_for_path and name_for_path and name_for_path != "local"):
            raise BadConfig("spec.output.pvc.path",
                            f"unset, and no ${ENV_NAMESPACE}/${ENV_NAME} to default it; set it or pass --output-dir")
        out = pvc_path(pvc.claim_name, output_subpath(ns_for_path or "default", name_for_path or "local", pvc.path))
    elif out is None:
        # S3 output: train into a local staging directory, upload the adapter at the end.
        s3_output = spec.output.s3
        staging = Path(tempfile.gettempdir()) / "llamaops-output"
        out = str(staging / (ns_for_path or "default") / (name_for_path or "local"))
    elif spec.output.s3 is not None:
        s3_output = spec.output.s3
    return RunConfig(spec=spec, name=name, namespace=namespace, output_dir=Path(out),
                     spec_hash=spec_hash(spec), s3_output=s3_output, report=os.environ.get(ENV_REPORT) or None)
