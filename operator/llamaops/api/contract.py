"""The contract between the operator (which builds training pods) and the trainer (which runs in them).

Paths, environment variables and exit codes live here once, so the Job
builder and the trainer cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from llamaops.api.finetune import FineTuneSpec

# Where the pod finds things.
SPEC_PATH = "/etc/llamaops/spec.yaml"  # the LlamaFineTune manifest, from a ConfigMap
PVC_ROOT = "/mnt/pvc"  # each PersistentVolumeClaim the run uses is mounted at PVC_ROOT/<claim>
HF_HOME = "/var/cache/huggingface"
SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # token, ca.crt, namespace
TERMINATION_LOG = "/dev/termination-log"  # the container's terminationMessagePath

# Environment the operator sets on training pods.
ENV_SPEC = "LLAMAOPS_SPEC"
ENV_NAME = "LLAMAOPS_NAME"  # the LlamaFineTune being trained
ENV_NAMESPACE = "LLAMAOPS_NAMESPACE"
# The run's report ConfigMap: the one object rank 0 may write (its Role allows nothing else). The operator
# reads it, checks it, and is the only writer of the LlamaFineTune's status.
ENV_REPORT = "LLAMAOPS_REPORT"
REPORT_PROGRESS = "progress"  # data key: the latest progress, JSON (api.finetune.Progress)
REPORT_ADAPTER = "adapter"  # data key: the saved adapter, JSON (api.finetune.AdapterReport)
ENV_PVC_ROOT = "LLAMAOPS_PVC_ROOT"  # overrides PVC_ROOT (local runs, the dev node)
ENV_OUTPUT_DIR = "LLAMAOPS_OUTPUT_DIR"  # overrides the output directory (local runs)
# Set by the dev node (llamaops_dev.devnode), whose pods are local processes without the pod's filesystem.
ENV_SERVICEACCOUNT_DIR = "LLAMAOPS_SERVICEACCOUNT_DIR"  # overrides SERVICEACCOUNT_DIR
ENV_TERMINATION_LOG = "LLAMAOPS_TERMINATION_LOG"  # overrides TERMINATION_LOG
# The Authorization header of an http dataset's download, from the Secret key spec.dataset.http.authSecretRef names.
ENV_HTTP_AUTHORIZATION = "LLAMAOPS_HTTP_AUTHORIZATION"
# Seconds between rank 0's report patches (default 5): tests of short runs lower it.
ENV_PROGRESS_INTERVAL = "LLAMAOPS_PROGRESS_INTERVAL"
PROGRESS_INTERVAL_S = 5.0
# Seconds from SIGTERM for the workers to finish their step and save a checkpoint (a little less than the
# pod's terminationGracePeriodSeconds, which the builder sizes from the measured step time); the launcher
# then kills them, so it can still exit with a contract code before the kubelet's SIGKILL.
ENV_STOP_TIMEOUT = "LLAMAOPS_STOP_TIMEOUT_SECONDS"

# Trainer exit codes, read by the Job's podFailurePolicy.
EXIT_OK = 0
EXIT_BAD_CONFIG = 64  # the spec cannot work (EX_USAGE): fail the run, do not retry
EXIT_BAD_DATA = 65  # the dataset is malformed (EX_DATAERR): fail the run, do not retry
EXIT_RETRYABLE = 75  # infrastructure trouble (EX_TEMPFAIL): restart the gang, resume from checkpoints
NON_RETRYABLE_EXIT_CODES = (EXIT_BAD_CONFIG, EXIT_BAD_DATA)

# Layout of a run's output directory.
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
COMPLETE_MARKER = "COMPLETE"  # written last inside ADAPTER_DIR, and inside each checkpoint, once it is whole
METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "llamaops.json"


def pvc_root() -> str:
    return os.environ.get(ENV_PVC_ROOT, PVC_ROOT)


def serviceaccount_dir() -> str:
    return os.environ.get(ENV_SERVICEACCOUNT_DIR, SERVICEACCOUNT_DIR)


def termination_log() -> str:
    return os.environ.get(ENV_TERMINATION_LOG, TERMINATION_LOG)


def progress_interval() -> float:
    """Seconds between rank 0's status patches (ValueError when the variable is not a number)."""
    value = os.environ.get(ENV_PROGRESS_INTERVAL)
    return PROGRESS_INTERVAL_S if value is None else float(value)


def redact_url(url: str) -> str:
    """A URL as it may be printed (logs, conditions, Events): no user:password@, no query string (pre-signed
    URLs carry their signature there), no fragment."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    netloc = f"***@{host}" if "@" in parts.netloc else host
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def pvc_path(claim: str, path: str | None = None, root: str | None = None) -> str:
    """Where a path on a claim is mounted inside the pod."""
    base = PurePosixPath(root or pvc_root()) / claim
    return str(base / path) if path else str(base)


def parse_pvc_uri(uri: str) -> tuple[str, str]:
    """pvc://<claim>/<path> -> (claim, path)."""
    if not uri.startswith("pvc://"):
        raise ValueError(f"not a pvc:// URI: {uri}")
    claim, _, path = uri[len("pvc://"):].partition("/")
    return claim, path


def output_subpath(namespace: str, name: str, path: str | None) -> str:
    """The run's directory inside its output claim: spec.output.pvc.path or <namespace>/<name>."""
    return path or f"{namespace}/{name}"


# The spec sections that change what is trained. Their hash tells a finished
# adapter (or a checkpoint) of this spec from one of an edited spec; scheduling
# fields (resources, queue, suspend, images) change where a run goes, not what it learns.
HASHED_SECTIONS = ("model", "lora", "quantization", "training", "systemPrompt", "dataset")


def digest(value: object) -> str:
    """SHA-256 of a JSON value, independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def spec_hash(spec: FineTuneSpec) -> str:
    wire = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    return digest({k: wire[k] for k in HASHED_SECTIONS if k in wire})
