"""The trainer reports its progress and adapter into its run's report ConfigMap on a real API server.

The trainer runs here as a local process (no pod): KUBECONFIG points it at the
cluster under test, LLAMAOPS_NAME/NAMESPACE/REPORT name the run and its report,
and LLAMAOPS_PVC_ROOT stands in for the claims the pod would mount. (The
operator, absent here, would carry the report into the run's status: test_e2e.)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from operator_fixtures import install_crds
from slow_trainer import slow_trainer_command

pytestmark = pytest.mark.cluster
MAX_STEPS = 16


@pytest.fixture(scope="module")
def crds(kubectl) -> None:
    install_crds(kubectl)


def _manifest(name: str) -> dict:
    return {
        "apiVersion": "llamaops.io/v1alpha1",
        "kind": "LlamaFineTune",
        "metadata": {"name": name},
        "spec": {
            "model": {"base_model": "pvc://demo/models/tiny-llama", "torch_dtype": "float32"},
            "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "training": {"max_steps": MAX_STEPS, "per_device_train_batch_size": 4, "learning_rate": 2e-2,
                         "max_seq_length": 256, "gradient_checkpointing": False, "bf16": False,
                         "logging_steps": 1, "save_steps": 8},
            "systemPrompt": "You answer in one sentence.",
            "dataset": {"pvc": {"claimName": "demo", "path": "datasets/chat.jsonl"}},
            "resources": {"gpusPerNode": 0},
            "output": {"pvc": {"claimName": "demo", "path": "adapters/" + name}},
        },
    }


def _report(kubectl, namespace: str, name: str) -> dict:
    obj = json.loads(kubectl("get", "-n", namespace, "configmap", f"{name}-report", "-o", "json").stdout)
    return {k: json.loads(v) for k, v in (obj.get("data") or {}).items()}


def _progress(kubectl, namespace: str, name: str) -> dict:
    return _report(kubectl, namespace, name).get("progress") or {}


def test_trainer_reports_progress_in_its_report(crds, kubectl, kubeconfig: Path, namespace: str,
                                               tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="needs the trainer extra")
    from llamaops_trainer import tiny

    root = tmp_path / "pvc"
    tiny.write_model(root / "demo" / "models" / "tiny-llama")
    tiny.write_jsonl(root / "demo" / "datasets" / "chat.jsonl", tiny.synthetic_chats(128, max_filler=12))
    name = "tiny-progress"
    doc = _manifest(name)
    kubectl("apply", "--server-side", "--field-manager=test", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    kubectl("create", "configmap", "-n", namespace, f"{name}-report")  # the operator makes it at admission
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))

    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LLAMAOPS_NAME": name, "LLAMAOPS_NAMESPACE": namespace,
           "LLAMAOPS_REPORT": f"{name}-report",
           "LLAMAOPS_PVC_ROOT": str(root), "LLAMAOPS_DATA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    env.pop("LLAMAOPS_OUTPUT_DIR", None)
    proc = subprocess.Popen(slow_trainer_command(0.4, "--spec", str(spec)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[dict] = []
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            progress = _progress(kubectl, namespace, name)
            if progress and (not seen or progress != seen[-1]):
                seen.append(progress)
            time.sleep(0.5)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]

    assert seen, "no progress reported while the trainer ran"
    assert seen[0]["step"] < MAX_STEPS, "progress appeared while training, not only at the end"
    final = _progress(kubectl, namespace, name)
    assert final["step"] == MAX_STEPS and final["totalSteps"] == MAX_STEPS
    assert final["display"] == f"{MAX_STEPS}/{MAX_STEPS}"
    assert isinstance(final["loss"], float) and final["loss"] > 0
    assert final["learningRate"] > 0 and final["tokensPerSecond"] > 0 and final["etaSeconds"] == 0
    assert final["updatedAt"].endswith("Z")
    # The adapter, as only the trainer knows it; and the run's status untouched (the operator's alone).
    adapter = _report(kubectl, namespace, name)["adapter"]
    assert adapter["r"] == 8 and adapter["baseModel"] == doc["spec"]["model"]["base_model"] and adapter["specHash"]
    run = json.loads(kubectl("get", "-n", namespace, "llamafinetune", name, "-o", "json").stdout)
    assert not run.get("status")
    # Output went where the pod would put it: the output claim's path.
    assert (root / "demo" / "adapters" / name / "adapter" / "COMPLETE").is_file()
    # No credential ever reaches the log.
    token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"].get("token")
    if token:
        assert token not in output
