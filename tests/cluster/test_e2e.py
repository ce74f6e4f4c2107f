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
    2. serving that adapter with Ollama on the dev node: the chat completion is
       the trained model's answer, the served prompt the trained one; re-training
       rolls out with no failed request; deleting the serve stops Ollama
    3. the same on `nodes: 2`: two processes, gloo rendezvous through the
       headless Service name (mapped to 127.0.0.1 on the dev node)
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from devnode_fixtures import NODE, DevNodeProcess, ollama_dir
from kubetest import wait_until
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
    token = (Path(record["mounts"]["/" + SA_DIR]) / "token").read_text()
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


QUESTION = "what colour does alice like?"


def _local_endpoint(c: Cluster, service: str) -> str:
    """http://127.0.0.1:PORT/v1: where the dev node publishes the Service on this machine."""
    def published() -> str | None:
        return ((c.get("service", service).get("metadata") or {}).get("annotations") or {}).get(
            "llamaops.io/local-endpoint")
    return f"http://{wait_until(published, f'Service {service} published on 127.0.0.1', timeout=30)}/v1"


def _chat(endpoint: str, model: str, question: str = QUESTION, timeout: float = 60) -> dict[str, Any]:
    import urllib.request

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
                       "max_tokens": 24}).encode()
    req = urllib.request.Request(f"{endpoint}/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _versioned(endpoint: str, adapter: str) -> str:
    """The adapter's versioned name among the models the server lists (`<name>:<version>`, besides :latest)."""
    import urllib.request

    with urllib.request.urlopen(f"{endpoint}/models", timeout=30) as resp:
        ids = [m["id"] for m in json.loads(resp.read())["data"]]
    [name] = [i for i in ids if i.startswith(f"{adapter}:") and i != f"{adapter}:latest"]
    return name


def _trained_answer(data: Path, adapter_dir: Path, system_prompt: str, question: str = QUESTION
                    ) -> tuple[str, str, int]:
    """What the trained model answers, by transformers + peft on the CPU, greedy: (answer, the prompt the
    trainer's chat template renders, its token count)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = data / "models" / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      adapter_dir).eval()
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), prompt, ids.shape[1]


def _wait_serving(c: Cluster, name: str, operator, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (status := c.get("lsv", name).get("status") or {}).get("phase") != "Ready":
        assert status.get("phase") != "Failed" and time.monotonic() < deadline, f"{status}\n{operator.tail()}"
        time.sleep(0.5)
    return status


def test_2_the_adapter_answers_through_ollama_on_the_dev_node(e2e: dict[str, Any], kubectl) -> None:
    """examples/tiny-llama-serve.yaml for test_1's run: Ollama (a real one, built from the Go module proxy) runs as
    the dev node's process with the pod's argv and Modelfiles; the chat completion through the Service's local
    port is what the trained model answers, while the base model answers otherwise; the served prompt is the
    trained one, byte for byte and token for token."""
    if "tiny" not in e2e["runs"]:
        pytest.skip("test_1 did not train the adapter")
    if ollama_dir() is None:
        pytest.skip("no ollama binary: `make test` builds it (hack/build-ollama.sh; LLAMAOPS_OLLAMA_BIN_DIR)")
    ns, c, agent = e2e["ns"], e2e["cluster"], e2e["agent"]
    adapter = e2e["runs"]["tiny"]["status"]["adapter"]
    doc = yaml.safe_load((REPO / "examples" / "tiny-llama-serve.yaml").read_text())
    doc["spec"]["model"]["base_model"] = f"pvc://{CLAIM}/models/tiny-llama"
    doc["spec"]["adapters"] = [{"name": "k8s-tiny", "fineTuneRef": "tiny"}]
    c.apply(doc)
    name = doc["metadata"]["name"]
    status = _wait_serving(c, name, e2e["operator"])
    assert status["readyReplicas"] == 1 and status["adapterNames"] == "k8s-tiny"
    [pod] = [p for p in c.get("pod", selector=f"llamaops.io/serve={name}")["items"]
             if not p["metadata"].get("deletionTimestamp")]
    assert pod["spec"]["nodeName"] == NODE and pod["status"]["podIP"].startswith("127.77.")
    # Whatever the pod spec says is what ran: the same argv, the Modelfiles of its ConfigMap.
    record = agent.record(ns, pod["metadata"]["name"], "server")
    dep = c.get("deployment", name)
    assert record["argv"] == dep["spec"]["template"]["spec"]["containers"][0]["command"]
    modelfile = c.get("configmap", f"{name}-modelfiles")["data"]["model-1"]
    assert "ADAPTER ../../../var/lib/llamaops/ollama/adapters/k8s-tiny" in modelfile
    assert f'SYSTEM """{adapter["systemPrompt"]}"""' in modelfile

    endpoint = _local_endpoint(c, name)
    tuned = _chat(endpoint, "k8s-tiny")
    base = _chat(endpoint, name)
    expected, prompt, prompt_tokens = _trained_answer(e2e["data"], e2e["data"] / "adapters" / "tiny" / "adapter",
                                                      adapter["systemPrompt"])
    answer = tuned["choices"][0]["message"]["content"]
    assert answer == expected, f"Ollama served {answer!r}; the trained model answers {expected!r}"
    assert re.fullmatch(r"\s*\w+ likes \w+\.", answer), answer  # the trained phrasing ...
    assert base["choices"][0]["message"]["content"] != answer  # ... which the base model does not answer
    # The served prompt is the trainer's: the same token count (Ollama's usage), and the same text, which
    # Ollama's trace log prints (OLLAMA_DEBUG=2, passed to the pod by the agent); Ollama adds the BOS token
    # when tokenizing, the trainer's template writes it.
    assert tuned["usage"]["prompt_tokens"] == prompt_tokens
    logged = agent.container_log(ns, pod["metadata"]["name"], "server")
    rendered = re.findall(r'msg="completion request" prompt="((?:[^"\\]|\\.)*)"', logged)
    assert rendered, logged[-2000:]
    assert "<|begin_of_text|>" + json.loads(f'"{rendered[0]}"') == prompt
    # The same weights under a name that changes with them: a client can tell which adapter version answers.
    versioned = _versioned(endpoint, "k8s-tiny")
    assert _chat(endpoint, versioned)["choices"][0]["message"]["content"] == answer
    e2e["serve"] = {"name": name, "endpoint": endpoint, "answer": answer, "pod": pod, "versioned": versioned}


def test_2b_retraining_rolls_out_without_a_failed_request(e2e: dict[str, Any]) -> None:
    """Re-train the served run on changed data: the serve rolls out the new adapter; a poller asking the adapter
    all along gets no error (new replica Ready before the old goes; the old one drains before SIGTERM)."""
    if "serve" not in e2e:
        pytest.skip("test_2 did not serve the adapter")
    from llamaops_trainer import tiny

    c, served = e2e["cluster"], e2e["serve"]
    # The same questions, another fact to learn: each name's colour moves three places on.
    rows = tiny.synthetic_chats(128, max_filler=12)
    colours = tiny.COLOURS
    for row in rows:
        said = row["messages"][1]["content"]
        who, colour = said.removesuffix(".").split(" likes ")
        row["messages"][1]["content"] = f"{who} likes {colours[(colours.index(colour) + 3) % len(colours)]}."
    tiny.write_jsonl(e2e["data"] / "datasets" / "chat-v2.jsonl", rows)

    failures: list[str] = []
    answers: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                answers.append(_chat(served["endpoint"], "k8s-tiny", timeout=30)["choices"][0]["message"]["content"])
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(repr(exc))
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        doc = _manifest("tiny")
        doc["spec"]["dataset"]["pvc"]["path"] = "datasets/chat-v2.jsonl"
        c.apply(doc)
        old = served["pod"]["metadata"]["name"]

        def rolled() -> bool:
            pods = c.get("pod", selector=f"llamaops.io/serve={served['name']}")["items"]
            return bool(pods) and all(p["metadata"]["name"] != old for p in pods) and all(
                any(x["type"] == "Ready" and x["status"] == "True" for x in p["status"].get("conditions", []))
                for p in pods)
        wait_until(rolled, "the retrained adapter rolled out", timeout=480, interval=1)
        time.sleep(1)
    finally:
        stop.set()
        poller.join(timeout=60)
    status = c.status("tiny")
    assert status["phase"] == "Succeeded"
    expected, _, _ = _trained_answer(e2e["data"], e2e["data"] / "adapters" / "tiny" / "adapter",
                                     status["adapter"]["systemPrompt"])
    now = _chat(served["endpoint"], "k8s-tiny")["choices"][0]["message"]["content"]
    assert now == expected and now != served["answer"], (now, expected, served["answer"])
    assert failures == [], f"{len(failures)} of {len(failures) + len(answers)} requests failed: {failures[:5]}"
    assert len(answers) > 10 and answers[-1] == now and served["answer"] in answers  # both adapters answered
    assert _versioned(served["endpoint"], "k8s-tiny") != served["versioned"]  # a new name for new weights


def test_2c_deleting_the_serve_stops_ollama_and_frees_its_ports(e2e: dict[str, Any]) -> None:
    if "serve" not in e2e:
        pytest.skip("test_2 did not serve the adapter")
    ns, c, agent, served = e2e["ns"], e2e["cluster"], e2e["agent"], e2e["serve"]
    pods = c.get("pod", selector=f"llamaops.io/serve={served['name']}")["items"]
    records = [agent.record(ns, p["metadata"]["name"], "server") for p in pods]
    addresses = [(p["status"]["podIP"], 11434) for p in pods]
    host, port = served["endpoint"].removeprefix("http://").removesuffix("/v1").split(":")
    c.kubectl("delete", "lsv", "-n", ns, served["name"], "--wait=true", "--timeout=120s")

    def gone() -> bool:
        return not c.get("pod", selector=f"llamaops.io/serve={served['name']}")["items"]
    wait_until(gone, "the serving pods deleted", timeout=120)

    def closed(address: tuple[str, int]) -> bool:
        import socket
        with socket.socket() as s:
            return s.connect_ex(address) != 0
    for record in records:  # the process group: the shell, `ollama serve` and its runners
        wait_until(lambda r=record: not Path(f"/proc/{r['pid']}").exists(), f"pid {record['pid']} gone", timeout=30)
    for address in [*addresses, (host, int(port))]:
        wait_until(lambda a=address: closed(a), f"{address} closed", timeout=30)


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
