"""What a trainer writes before it exits 0, for the benchmarks' simulated kubelets: its report ConfigMap's progress
and saved adapter (an S3 run without it fails AdapterMissing, as it should)."""

from __future__ import annotations

import json
from typing import Any

from llamaops.api import LlamaFineTune
from llamaops.api.constants import FINETUNES, GROUP, VERSION
from llamaops.api.contract import REPORT_ADAPTER, REPORT_PROGRESS, spec_hash


def write(core: Any, custom: Any, namespace: str, run: str, steps: int = 100) -> dict[str, Any]:
    """Writes the run's report as its trainer would (the adapter uploaded under its S3 output); returns the progress."""
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, FINETUNES, run)
    spec = LlamaFineTune.model_validate({**obj, "status": None}).spec
    progress = {"step": steps, "totalSteps": steps, "display": f"{steps}/{steps}", "loss": 1.0}
    adapter = {"baseModel": spec.model.base_model, "r": spec.lora.r, "specHash": spec_hash(spec)}
    if spec.output.s3 is not None:
        adapter["uri"] = spec.output.s3.uri.rstrip("/") + "/adapter"
    core.patch_namespaced_config_map(f"{run}-report", namespace, {"data": {
        REPORT_PROGRESS: json.dumps(progress), REPORT_ADAPTER: json.dumps(adapter)}})
    return progress
