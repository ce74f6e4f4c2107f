"""The dev node's pod runner against a fake API: volumes, env, processes, exit codes, deletion."""

from __future__ import annotations

import base64
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from llamaops_dev.devnode import node, status
from llamaops_dev.devnode.runner import NodeContext, PodWorker
from llamaops_dev.devnode.volumes import Materialiser, VolumeError, mirror_mounts


class FakeApi:
    def __init__(self, tmp: Path) -> None:
        self.config_maps: dict[tuple[str, str], dict[str, str]] = {
            ("ns", "cfg"): {"greeting": "hello", "spec.yaml": "kind: Spec\n"},
            ("ns", "kube-root-ca.crt"): {"ca.crt": "CA"}}
        self.secrets = {("ns", "creds"): {"password": base64.b64encode(b"pw").decode()}}
        self.claims = {("ns", "data"): str(tmp / "hostpath-data")}
        self.statuses: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.tokens: list[tuple[str, str | None]] = []

    def config_map(self, ns: str, name: str) -> dict[str, str] | None:
        return self.config_maps.get((ns, name))

    def config_map_bytes(self, ns: str, name: str) -> dict[str, bytes] | None:
        data = self.config_maps.get((ns, name))
        return None if data is None else {k: v.encode() for k, v in data.items()}

    def secret(self, ns: str, name: str) -> dict[str, str] | None:
        return self.secrets.get((ns, name))

    def claim_host_path(self, ns: str, claim: str) -> str | None:
        return self.claims.get((ns, claim))

    def token(self, ns: str, account: str, pod: Any, audience: str | None, seconds: int) -> tuple[str, dt.datetime]:
        self.tokens.append((account, audience))
        return f"token-of-{account}", dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)

    def services(self, ns: str) -> list[str]:
        return ["job"]

    def patch_pod_status(self, ns: str, name: str, st: dict[str, Any]) -> None:
        self.statuses.append(json.loads(json.dumps(st)))

    def delete_pod_now(self, ns: str, name: str, uid: str) -> None:
        self.deleted.append(name)

    def event(self, pod: Any, node_name: str, kind: str, reason: str, message: str) -> None:
        self.events.append((reason, message))

    @property
    def phases(self) -> list[str]:
        return [s["phase"] for s in self.statuses]


SA_VOLUME = {"name": "kube-api-access", "projected": {"sources": [
    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}
SA_MOUNT = {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
            "readOnly": True}

# Prints what a test checks: argv, env, the files it sees through the translated paths.
SCRIPT = r"""
import json, os, sys
sa = os.environ["LLAMAOPS_SERVICEACCOUNT_DIR"]
out = {"argv": sys.argv[1:], "greeting": os.environ.get("GREETING"), "index": os.environ.get("INDEX"),
       "password": os.environ.get("PASSWORD"), "kube": os.environ["KUBERNETES_SERVICE_HOST"],
       "spec": open(sys.argv[1]).read(), "token": open(sa + "/token").read(), "ca": open(sa + "/ca.crt").read(),
       "namespace": open(sa + "/namespace").read(), "pvc_root": os.environ.get("LLAMAOPS_PVC_ROOT"),
       "kubeconfig": os.environ.get("KUBECONFIG")}
open(os.environ["LLAMAOPS_PVC_ROOT"] + "/data/written", "w").write("yes")
print(json.dumps(out))
open(os.environ["LLAMAOPS_TERMINATION_LOG"], "w").write("bye")
sys.exit(int(os.environ.get("CODE", "0")))
"""


def _pod(command: list[str], env: list[dict[str, Any]] | None = None, restart: str = "Never",
         deletion: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "uid-1",
                     "annotations": {"batch.kubernetes.io/job-completion-index": "3"}},
        "spec": {"nodeName": "local-cpu", "restartPolicy": restart, "serviceAccountName": "runner",
                 "containers": [{"name": "main", "image": "ignored:1", "command": command,
                                 "env": env or [], "terminationMessagePolicy": "FallbackToLogsOnError",
                                 "volumeMounts": [
                                     {"name": "cfg", "mountPath": "/etc/app"},
                                     {"name": "data", "mountPath": "/mnt/pvc/data"},
                                     {"name": "scratch", "mountPath": "/tmp"}, SA_MOUNT]}],
                 "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}},
                             {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                             {"name": "scratch", "emptyDir": {}}, SA_VOLUME]},
        "status": {"phase": "Pending"},
    }


def _worker(tmp: Path, pod: dict[str, Any]) -> tuple[PodWorker, FakeApi]:
    api = FakeApi(tmp)
    ctx = NodeContext(api=api, node="local-cpu", work_dir=tmp / "work",
                      materialiser=Materialiser(api, tmp / "pvc"),
                      base_env={"PATH": "/usr/bin:/bin", "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                                "KUBERNETES_SERVICE_PORT": "16443"},
                      python=sys.executable)
    return PodWorker(ctx, pod), api


ENV = [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
       {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
       {"name": "INDEX", "valueFrom": {"fieldRef": {
           "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]


def test_a_pod_runs_as_a_process_with_its_volumes_env_and_token(tmp_path: Path) -> None:
    pod = _pod(["python", "-c", SCRIPT, "/etc/app/spec.yaml", "--rank=$(INDEX)"], ENV)
    worker, api = _worker(tmp_path, pod)
    worker.run()
    assert api.phases[0] == "Pending" and api.phases[-1] == "Succeeded"
    assert "Running" in api.phases
    final = api.statuses[-1]
    term = final["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed" and term["message"] == "bye"
    assert final["podIP"] == worker.ip and worker.ip.startswith("127.77.")  # a loopback IP of its own
    conditions = {c["type"]: c["status"] for c in final["conditions"]}
    assert conditions["Ready"] == "False" and conditions["PodScheduled"] == "True"
    out = json.loads((tmp_path / "work/pods/ns/p/main.log").read_text())
    assert out["argv"][1] == "--rank=3"
    assert out["argv"][0].endswith("/root/main/etc/app/spec.yaml")
    assert out["spec"] == "kind: Spec\n"
    assert (out["greeting"], out["password"], out["index"]) == ("hello", "pw", "3")
    assert (out["token"], out["ca"], out["namespace"]) == ("token-of-runner", "CA", "ns")
    assert out["kube"] == "127.0.0.1" and out["kubeconfig"] is None
    assert (tmp_path / "hostpath-data" / "written").read_text() == "yes"  # the claim is its hostPath PV
    record = json.loads((tmp_path / "work/pods/ns/p/main.json").read_text())
    assert record["argv"] == ["python", "-c", SCRIPT, "/etc/app/spec.yaml", "--rank=3"]
    assert record["localArgv"][0] == sys.executable
    assert api.tokens == [("runner", None)]
    assert not api.deleted


def test_a_failed_container_reports_exit_code_and_log_tail(tmp_path: Path) -> None:
    pod = _pod(["python", "-c", "import sys; print('line one'); print('it broke'); sys.exit(65)"])
    worker, api = _worker(tmp_path, pod)
    worker.run()
    assert api.phases[-1] == "Failed"
    term = api.statuses[-1]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 65 and term["reason"] == "Error"
    assert term["message"].endswith("line one\nit broke")  # FallbackToLogsOnError


def test_on_failure_restarts_the_container(tmp_path: Path) -> None:
    marker = tmp_path / "ran-once"
    code = f"import os,sys; p={str(marker)!r}; first=not os.path.exists(p); open(p,'w').close(); sys.exit(3 if first else 0)"
    worker, api = _worker(tmp_path, _pod(["python", "-c", code], restart="OnFailure"))
    worker.run()
    final = api.statuses[-1]
    assert final["phase"] == "Succeeded"
    assert final["containerStatuses"][0]["restartCount"] == 1
    assert final["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 3


def test_deleting_the_pod_terminates_its_process_group_then_removes_it(tmp_path: Path) -> None:
    # The child ignores SIGTERM: only the SIGKILL after the grace period ends it.
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143));"
            "subprocess.Popen([sys.executable, '-c', 'import signal,time; signal.signal(signal.SIGTERM, "
            "signal.SIG_IGN); open(\"child-up\",\"w\").close(); time.sleep(600)']); time.sleep(600)")
    worker, api = _worker(tmp_path, _pod(["python", "-c", code]))
    worker.start()
    pod_dir = tmp_path / "work/pods/ns/p"
    deadline = time.monotonic() + 20
    while not (pod_dir / "child-up").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (pod_dir / "child-up").exists()
    record = json.loads((pod_dir / "main.json").read_text())
    started = time.monotonic()
    worker.stop(1, delete=True)
    worker.join(30)
    assert not worker.is_alive()
    assert time.monotonic() - started < 15
    assert api.deleted == ["p"]
    term = api.statuses[-1]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 143
    # The whole group is gone, the child that ignored SIGTERM too (zombies waiting for init aside).
    deadline = time.monotonic() + 5
    while _group_alive(record["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group_alive(record["pid"])


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(stat.parent.name))
    return alive


def test_a_missing_configmap_keeps_the_pod_pending_until_it_appears(tmp_path: Path) -> None:
    pod = _pod(["python", "-c", "print('ok')"])
    pod["spec"]["volumes"][0]["configMap"]["name"] = "later"
    worker, api = _worker(tmp_path, pod)
    worker.start()
    deadline = time.monotonic() + 10
    while not api.events and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.events[0][0] == "FailedMount" and "later" in api.events[0][1]
    waiting = api.statuses[-1]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ContainerCreating" and "later" in waiting["message"]
    api.config_maps[("ns", "later")] = {"x": "y"}
    worker.join(20)
    assert api.phases[-1] == "Succeeded"


def test_mirror_mounts_with_subpath_and_unknown_volume(tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    paths = mirror_mounts(tmp_path / "root", [{"name": "v", "mountPath": "/a/b", "subPath": "sub"}], {"v": vol})
    assert paths == ["/a/b"]
    assert (tmp_path / "root/a/b").resolve() == (vol / "sub").resolve()
    with pytest.raises(VolumeError, match="names no volume"):
        mirror_mounts(tmp_path / "root2", [{"name": "nope", "mountPath": "/x"}], {})


def test_phase_and_termination_message(tmp_path: Path) -> None:
    c = status.ContainerState("main")
    state = status.PodState([c], initialized=True)
    assert status.phase(state) == "Pending"
    c.pid, c.started_at = 1, "t"
    assert status.phase(state) == "Running"
    c.exit_code = 1
    assert status.phase(state, "Never") == "Failed"
    assert status.phase(state, "OnFailure") == "Running"
    c.exit_code = 0
    assert status.phase(state) == "Succeeded"
    log = tmp_path / "log"
    log.write_text("\n".join(f"l{i}" for i in range(200)))
    assert status.termination_message(None, log, 1, "File") == ""
    msg = status.termination_message(None, log, 1, "FallbackToLogsOnError")
    assert msg.endswith("l199") and len(msg.splitlines()) == 80


def test_node_manifest_is_tainted_and_not_kwoks() -> None:
    m = node.node_manifest(node.NodeConfig("local-cpu", cpu="4", memory="8Gi"))
    assert m["spec"]["taints"] == [{"key": "llamaops.io/dev-node", "value": "true", "effect": "NoSchedule"}]
    assert m["metadata"]["labels"]["llamaops.io/dev-node"] == "true"
    assert not m["metadata"].get("annotations")  # kwok manages nodes by annotation only
    assert m["status"]["capacity"]["cpu"] == "4" and m["status"]["allocatable"]["memory"] == "8Gi"
    ready = [c for c in m["status"]["conditions"] if c["type"] == "Ready"]
    assert ready[0]["status"] == "True"
