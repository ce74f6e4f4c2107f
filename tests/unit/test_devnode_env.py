"""The dev node's env resolution and localisation (llamaops_dev.devnode.env)."""

from __future__ import annotations

import base64

import pytest
from llamaops_dev.devnode import env

POD = {
    "metadata": {"name": "run-train-0-abcde", "namespace": "team", "uid": "u1",
                 "labels": {"app": "x"},
                 "annotations": {"batch.kubernetes.io/job-completion-index": "1"}},
    "spec": {"nodeName": "local-cpu", "serviceAccountName": "run-trainer", "hostname": "run-train-1",
             "subdomain": "run-train"},
    "status": {},
}


def _lookup(store):
    return lambda ns, name: store.get((ns, name))


def test_env_resolves_values_refs_and_expansion() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "base"}, "prefix": "CM_"}],
        "env": [
            {"name": "A", "value": "one"},
            {"name": "B", "value": "$(A)-two-$$(A)-$(NOPE)"},
            {"name": "INDEX", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "base", "key": "k"}}},
            {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "x", "optional": True}}},
            {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        ],
        "resources": {"limits": {"cpu": "1500m"}},
    }
    cms = {("team", "base"): {"k": "v"}}
    secrets = {("team", "creds"): {"token": base64.b64encode(b"s3cret").decode()}}
    out = env.resolve(POD, container, config_maps=_lookup(cms), secrets=_lookup(secrets))
    assert out == {"CM_k": "v", "A": "one", "B": "one-two-$(A)-$(NOPE)", "INDEX": "1", "NS": "team",
                   "IP": "127.0.0.1", "FROM_CM": "v", "FROM_SECRET": "s3cret", "CPUS": "2"}


def test_missing_config_is_a_config_error() -> None:
    container = {"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k"}}}]}
    with pytest.raises(env.ConfigError, match="configMap 'gone' not found"):
        env.resolve(POD, container, config_maps=_lookup({}), secrets=_lookup({}))
    container = {"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}]}
    with pytest.raises(env.ConfigError, match="key 'k' not found"):
        env.resolve(POD, container, config_maps=_lookup({("team", "cm"): {}}), secrets=_lookup({}))


def test_command_line_expands_and_needs_a_command() -> None:
    c = {"command": ["python", "-m", "x"], "args": ["--node-rank=$(JOB_COMPLETION_INDEX)", "$(MISSING)"]}
    assert env.command_line(c, {"JOB_COMPLETION_INDEX": "1"}) == [
        "python", "-m", "x", "--node-rank=1", "$(MISSING)"]
    with pytest.raises(env.ConfigError, match="explicit command"):
        env.command_line({"args": ["a"]}, {})


@pytest.mark.parametrize(("name", "local"), [
    ("run-train", True),  # the headless Service
    ("run-train-0.run-train", True),  # pod hostname.subdomain, as the builder's --master-addr
    ("run-train-0.run-train.team", True),
    ("run-train-0.run-train.team.svc", True),
    ("run-train-0.run-train.team.svc.cluster.local", True),
    ("run-train.team.svc.cluster.local", True),
    ("other.elsewhere.svc", True),  # a Service of another namespace is still the cluster
    ("run-train-0.unknown", False),
    ("example.com", False),
    ("model.safetensors", False),
    ("svc", False),
])
def test_cluster_host(name: str, local: bool) -> None:
    assert env.cluster_host(name, "team", ["run-train", "kubernetes"]) is local


def test_localise_hosts_and_paths() -> None:
    services = ["run-train"]
    mounts = ["/mnt/pvc/data", "/etc/llamaops", "/tmp"]

    def loc(v: str) -> str:
        return env.localise(v, namespace="team", services=services, mount_paths=mounts, root="/w/root/trainer")

    assert loc("--master-addr=run-train-0.run-train") == "--master-addr=127.0.0.1"
    assert loc("run-train-0.run-train:29500") == "127.0.0.1:29500"
    assert loc("--rdzv-endpoint=run-train.team.svc:29400") == "--rdzv-endpoint=127.0.0.1:29400"
    assert loc("--nnodes=2") == "--nnodes=2"
    assert loc("-m") == "-m"
    assert loc("llamaops_trainer") == "llamaops_trainer"
    assert loc("run-train") == "run-train"  # a word that equals a Service's name is no address without a port
    assert loc("run-train:29500") == "127.0.0.1:29500"
    assert env.localise("0.0.0.0:11434", namespace="team", services=services, mount_paths=mounts, root="/w",
                        pod_ip="127.77.0.9") == "127.77.0.9:11434"  # the wildcard: the pod's own address
    assert loc("/etc/llamaops/spec.yaml") == "/w/root/trainer/etc/llamaops/spec.yaml"
    assert loc("--spec=/etc/llamaops/spec.yaml") == "--spec=/w/root/trainer/etc/llamaops/spec.yaml"
    assert loc("/mnt/pvc/data") == "/w/root/trainer/mnt/pvc/data"
    assert loc("/mnt/pvc/database") == "/mnt/pvc/database"  # not under a mount: left alone
    assert loc("/etc/passwd") == "/etc/passwd"


def test_python_is_this_interpreter() -> None:
    assert env.local_argv(["python", "-m", "x"], "/venv/bin/python") == ["/venv/bin/python", "-m", "x"]
    assert env.local_argv(["/usr/bin/python3", "-c", "1"], "/venv/bin/python")[0] == "/venv/bin/python"
    assert env.local_argv(["sh", "-c", "true"], "/venv/bin/python") == ["sh", "-c", "true"]


def test_contract_path_overrides_the_dev_node_sets(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from llamaops.api import contract
    from llamaops_trainer import launch

    assert contract.serviceaccount_dir() == "/var/run/secrets/kubernetes.io/serviceaccount"
    monkeypatch.setenv(contract.ENV_SERVICEACCOUNT_DIR, str(tmp_path / "sa"))
    assert contract.serviceaccount_dir() == str(tmp_path / "sa")
    message = tmp_path / "termination-log"
    message.write_text("")
    monkeypatch.delenv(launch.ENV_EXIT_DIR, raising=False)
    monkeypatch.setenv(contract.ENV_TERMINATION_LOG, str(message))
    launch.termination_message("bad data: line 1")
    assert message.read_text() == "bad data: line 1"
