"""End to end on the local control plane: `kubectl apply` -> queued, admitted, really trained -> adapter.

The operator runs in demo mode (LLAMAOPS_DEV_NODE), so its training pods go to
the dev node (llamaops_dev.devnode), whose agent runs them as local processes: the
trainer image's command line, the spec from the Job's ConfigMap, the claim a
hostPath PV backs, a token of the run's own ServiceAccount. kwok keeps
simulating every other node.

The steps share one module (one agent, one operator) and run in order:

    1. a tiny Llama on one node: Succeeded, the operator's command line ran,
       progress reported during training under the run's ServiceAccount,
       the adapter on the claim with the right base model
    2. serving that adapter: a LlamaServe Ready, its Deployment naming exactly
       the adapter (the vLLM pod is simulated by kwok on a GPU node)
    3. the same on `nodes: 2`: two processes, gloo rendezvous through the
       headless Service name (mapped to 127.0.0.1 on the dev node)
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from devnode_fixtures import NODE, DevNodeProcess
from llamaops_dev.devcluster.processes import log_tail
from operator_fixtures import Cluster, crd_namespace, running_operator

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
CLAIM = "data"
MAX_STEPS = 200  # about 12 s of training on a laptop CPU: long enough to see progress on the way
SA_DIR = "var/run/secrets/kubernetes.io/serviceaccount"


@pytest.fixture(scope="module")
def e2e(cluster, kubectl, k8s, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
        ) -> Iterator[dict[str, Any]]:
    """CRDs, a namespace with a hostPath-backed claim holding a tiny Llama and a chat dataset,
    the dev node agent, and the operator in demo mode."""
    if not cluster.local:
        pytest.skip("the dev node registers a Node: only on the local control plane")
    pytest.importorskip("torch", reason="needs the trainer extra")
    from llamaops_trainer import tiny

    tmp = tmp_path_factory.mktemp("e2e")
    data = tmp / CLAIM
    tiny.write_model(data / "models" / "tiny-llama")
    tiny.write_jsonl(data / "datasets" / "chat.jsonl", tiny.synthetic_chats(128, max_filler=12))
    agent = DevNodeProcess(kubectl, cluster.kubeconfig, tmp / "devnode")
    failed_before = request.session.testsfailed
    with crd_namespace(kubectl, "e2e") as ns:
        c = Cluster(kubectl, ns, tmp)
        c.volumes(CLAIM)  # a PV with hostPath tmp/data: the agent uses that directory as the claim
        setup_failed = True
        try:
            agent.start()
            with running_operator(cluster.kubeconfig, tmp, ns, LLAMAOPS_DEV_NODE=NODE,
                                  LLAMAOPS_ADMISSION_INTERVAL="0.5") as operator:
                setup_failed = False
                yield {"cluster": c, "k8s": k8s, "ns": ns, "data": data, "agent": agent, "operator": operator,
                       "runs": {}}
        finally:
            agent.stop()
            # The logs, when this setup or a test of the module failed. Printed past pytest's capture:
            # a module fixture's teardown output is shown only if the module's last test fails.
            if setup_failed or request.session.testsfailed > failed_before:
                capture = request.config.pluginmanager.get_plugin("capturemanager")
                with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
                    print(f"\n--- e2e operator log\n{log_tail(tmp / 'operator.log', 60)}"
                          f"--- e2e agent log\n{agent.tail()}")


def _manifest(name: str, nodes: int = 1) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "tiny-llama-cpu.yaml").read_text())
    doc["metadata"] = {"name": name}
    spec = doc["spec"]
    spec["model"]["base_model"] = f"pvc://{CLAIM}/models/tiny-llama"
    spec["dataset"]["pvc"] = {"claimName": CLAIM, "path": "datasets/chat.jsonl"}
    spec["output"]["pvc"] = {"claimName": CLAIM, "path": f"adapters/{name}"}
    spec["training"].update(max_steps=MAX_STEPS, save_steps=100, logging_steps=5)
    # Multi-node runs need GPUs in the API (CEL); demo mode trains them on the dev node's CPU all the same.
    spec["resources"] = {"gpusPerNode": 1 if nodes > 1 else 0, "nodes": nodes, "cpu": "1", "memory": "2Gi"}
    return doc


def _watch_progress(k8s, ns: str, name: str, seen: list[tuple[str, dict[str, Any]]],
                    done: threading.Event) -> None:
    """Every version of the run's status, from a watch (polling can miss a short run's progress patches);
    sets `done` when the run is Succeeded or Failed, and returns once `done` is set (by _train on timeout)."""
    from kubernetes import client, watch

    api = client.CustomObjectsApi(k8s)
    while not done.is_set():
        w = watch.Watch()
        try:
            for event in w.stream(api.list_namespaced_custom_object, "llamaops.io", "v1alpha1", ns, "llamafinetunes",
                                  field_selector=f"metadata.name={name}", timeout_seconds=5):
                status = event["object"].get("status") or {}
                seen.append((status.get("phase", ""), status.get("progress") or {}))
                if status.get("phase") in ("Succeeded", "Failed"):
                    done.set()
                if done.is_set():
                    w.stop()
        except Exception:  # noqa: BLE001 - the API server hiccuped: watch again (a new watch lists first)
            time.sleep(0.5)


def _train(e2e: dict[str, Any], name: str, nodes: int, timeout: float) -> dict[str, Any]:
    """Apply a run and follow it to Succeeded; returns what was seen on the way."""
    c: Cluster = e2e["cluster"]
    seen: list[tuple[str, dict[str, Any]]] = []
    done = threading.Event()
    watcher = threading.Thread(target=_watch_progress, args=(e2e["k8s"], e2e["ns"], name, seen, done), daemon=True)
    watcher.start()
    c.apply(_manifest(name, nodes))
    done.wait(timeout)
    done.set()  # timed out: stop the watcher
    watcher.join(timeout=10)
    status = c.status(name)
    phase = status.get("phase", "")
    agent: DevNodeProcess = e2e["agent"]
    pods = c.pods(name)
    logs = "\n".join(f"--- {p['metadata']['name']}\n"
                     + agent.container_log(e2e["ns"], p["metadata"]["name"], "trainer")[-3000:] for p in pods)
    assert phase == "Succeeded", f"{name}: {status}\n{logs}\n{agent.tail()}"
    return {"status": status, "seen": seen, "pods": pods, "logs": logs}


def _jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_1_a_tiny_llama_trains_on_the_dev_node(e2e: dict[str, Any], kubectl) -> None:
    ns, name, agent = e2e["ns"], "tiny", e2e["agent"]
    run = _train(e2e, name, nodes=1, timeout=420)
    e2e["runs"][name] = run
    status = run["status"]

    # The Job's pod ran on the dev node, with exactly the operator's command line.
    job = e2e["cluster"].job(name)
    ctr = job["spec"]["template"]["spec"]["containers"][0]
    [pod] = run["pods"]
    assert pod["spec"]["nodeName"] == NODE and pod["status"]["phase"] == "Succeeded"
    record = agent.record(ns, pod["metadata"]["name"], "trainer")
    assert record["argv"] == ctr["command"] + ctr["args"]
    assert record["argv"][:3] == ["python", "-m", "llamaops_trainer.launch"]
    assert "KUBECONFIG" not in record["env"]

    # Progress reached the object while training: written by the trainer, with its own ServiceAccount, into its
    # report ConfigMap (all its Role allows), and by the operator, the only writer of the run's status, from there.
    during = [p for phase, p in run["seen"] if phase == "Running" and 0 < p.get("step", 0) < MAX_STEPS]
    assert during, f"no progress seen during training: {run['seen'][-5:]}"
    assert status["progress"]["step"] == MAX_STEPS and status["progress"]["loss"] > 0
    obj = json.loads(kubectl("get", "lft", "-n", ns, name, "-o", "json", "--show-managed-fields").stdout)
    managers = {m["manager"]: m for m in obj["metadata"]["managedFields"] if m.get("subresource") == "status"}
    assert "f:progress" in managers["llamaops"]["fieldsV1"]["f:status"] and "llamaops-trainer" not in managers
    report = json.loads(kubectl("get", "configmap", "-n", ns, f"{name}-report", "-o", "json",
                                "--show-managed-fields").stdout)
    writers = {m["manager"]: m for m in report["metadata"]["managedFields"]}
    assert "f:progress" in writers["llamaops-trainer"]["fieldsV1"]["f:data"]
    assert json.loads(report["data"]["progress"])["step"] == MAX_STEPS
    assert json.loads(report["data"]["adapter"])["r"] == status["adapter"]["r"]
    token = (Path(record["root"]) / SA_DIR / "token").read_text()
    claims = _jwt_claims(token)
    assert claims["sub"] == f"system:serviceaccount:{ns}:{name}-trainer"
    assert claims["kubernetes.io"]["pod"]["name"] == pod["metadata"]["name"]  # bound to the pod
    assert pod["spec"]["serviceAccountName"] == f"{name}-trainer"

    # The adapter, on the claim, for the base model the run names.
    adapter = e2e["data"] / "adapters" / name / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"pvc://{CLAIM}/models/tiny-llama"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "COMPLETE").is_file()
    assert status["adapter"]["uri"] == f"pvc://{CLAIM}/adapters/{name}/adapter"


def test_2_the_adapter_is_served(e2e: dict[str, Any], kubectl) -> None:
    """examples/tiny-llama-serve.yaml for test_1's run: Ready (kwok plays the vLLM pod on a GPU node),
    its Deployment serving exactly that adapter, read-only from the claim, with the run's system prompt."""
    if "tiny" not in e2e["runs"]:
        pytest.skip("test_1 did not train the adapter")
    ns, c = e2e["ns"], e2e["cluster"]
    adapter = e2e["runs"]["tiny"]["status"]["adapter"]
    doc = yaml.safe_load((REPO / "examples" / "tiny-llama-serve.yaml").read_text())
    doc["spec"]["model"]["base_model"] = f"pvc://{CLAIM}/models/tiny-llama"
    doc["spec"]["adapters"] = [{"name": "k8s-tiny", "fineTuneRef": "tiny"}]
    c.apply(doc)
    name = doc["metadata"]["name"]

    deadline = time.monotonic() + 120
    while (status := c.get("lsv", name).get("status") or {}).get("phase") != "Ready":
        assert status.get("phase") != "Failed" and time.monotonic() < deadline, \
            f"{status}\n{e2e['operator'].tail()}"
        time.sleep(0.5)
    assert status["readyReplicas"] == 1 and status["adapterNames"] == "k8s-tiny"
    [served] = status["adapters"]
    assert served["uri"] == adapter["uri"] and served["name"] == "k8s-tiny"
    assert status["endpoint"] == f"http://{name}.{ns}.svc:8000/v1"

    dep = c.get("deployment", name)
    pod = dep["spec"]["template"]["spec"]
    [server] = pod["containers"]
    args = server["args"]
    module = json.loads(args[args.index("--lora-modules") + 1])
    assert module["name"] == "k8s-tiny"
    # The path vLLM loads is the run's adapter directory on its claim, mounted read-only.
    [mount] = [m for m in server["volumeMounts"] if m["mountPath"] == module["path"]]
    assert mount["readOnly"] is True
    claim_path = adapter["uri"].removeprefix(f"pvc://{CLAIM}/")
    assert mount["subPath"] == claim_path
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == CLAIM
    assert (e2e["data"] / claim_path / "adapter_config.json").is_file()
    # The system prompt the run trained with is the served default.
    assert "--chat-template" in args
    template = c.get("configmap", f"{name}-chat-template")
    assert json.dumps(adapter["systemPrompt"])[1:-1] in "".join(template["data"].values())
    ready = [p for p in c.get("pod", selector=f"llamaops.io/serve={name}")["items"]
             if any(cond["type"] == "Ready" and cond["status"] == "True" for cond in p["status"].get("conditions", []))]
    assert len(ready) == 1 and ready[0]["spec"]["nodeName"] != NODE  # a simulated GPU node, not the dev node


def test_3_two_nodes_rendezvous_over_gloo_through_the_headless_service(e2e: dict[str, Any]) -> None:
    ns, name, agent = e2e["ns"], "tiny-2n", e2e["agent"]
    run = _train(e2e, name, nodes=2, timeout=480)
    pods = sorted(run["pods"], key=lambda p: int(p["metadata"]["annotations"][
        "batch.kubernetes.io/job-completion-index"]))
    assert len(pods) == 2 and {p["spec"]["nodeName"] for p in pods} == {NODE}
    job = f"{name}-train"
    for rank, pod in enumerate(pods):
        record = agent.record(ns, pod["metadata"]["name"], "trainer")
        assert f"--node-rank={rank}" in record["argv"]  # $(JOB_COMPLETION_INDEX), expanded
        assert f"--master-addr={job}-0.{job}" in record["argv"]  # the headless Service name ...
        assert "--master-addr=127.0.0.1" in record["localArgv"]  # ... resolved on the dev node
    out = e2e["data"] / "adapters" / name
    start = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"event": "start"' in line]
    assert start and start[-1]["world_size"] == 2, run["logs"]
    info = json.loads((out / "adapter" / "llamaops.json").read_text())
    assert info["world_size"] == 2
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        f"pvc://{CLAIM}/models/tiny-llama"
