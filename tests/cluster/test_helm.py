"""The Helm chart against a real API server: install, upgrade, uninstall, and the schema at install time.

The operator pod lands on a kwok node, which "runs" it without running anything: these tests check what
Helm and the API server make of the chart (objects, pod template, the restricted Pod Security profile
admitting the pod). The operator's behaviour under the chart's RBAC is test_rbac.py's job.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetest import wait_until

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llamaops"


class Helm:
    """`helm --kubeconfig <cluster>`, with its cache/config/data kept under a temporary directory."""

    def __init__(self, binary: str, kubeconfig: Path, home: Path) -> None:
        self.binary, self.kubeconfig = binary, kubeconfig
        self.env = dict(os.environ, HELM_CACHE_HOME=str(home / "cache"), HELM_CONFIG_HOME=str(home / "config"),
                        HELM_DATA_HOME=str(home / "data"), KUBECONFIG=str(kubeconfig))

    def __call__(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.binary, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr}{proc.stdout}")
        return proc

    def install(self, release: str, namespace: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self("install", release, str(CHART), "--namespace", namespace, *args, check=check)


def helm_binary(cluster: Any) -> str:
    candidates = []
    if os.environ.get("LLAMAOPS_BIN_DIR"):
        candidates.append(Path(os.environ["LLAMAOPS_BIN_DIR"]) / "helm")
    if cluster.bin_dir is not None:
        candidates.append(Path(cluster.bin_dir) / "helm")
    found = next((str(c) for c in candidates if os.access(c, os.X_OK)), None)
    if found is None:
        pytest.skip("no helm: set LLAMAOPS_BIN_DIR (hack/build-binaries.sh builds it)")
    return found


@pytest.fixture(scope="module")
def helm(cluster, tmp_path_factory) -> Helm:
    return Helm(helm_binary(cluster), cluster.kubeconfig, tmp_path_factory.mktemp("helm"))


def get(kubectl, *args: str) -> dict[str, Any] | None:
    proc = kubectl("get", *args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


@pytest.fixture(scope="module")
def release(helm: Helm, kubectl) -> Iterator[tuple[str, str]]:
    """The chart installed with its defaults into a namespace that enforces the restricted Pod Security profile."""
    name, ns = f"lo-{secrets.token_hex(3)}", f"llamaops-{secrets.token_hex(3)}"
    kubectl("create", "namespace", ns)
    kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest")
    yield name, ns
    helm("uninstall", name, "--namespace", ns, check=False)
    kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _deployment(kubectl, name: str, ns: str) -> dict[str, Any]:
    dep = get(kubectl, "deployment", f"{name}-llamaops", "-n", ns)
    assert dep is not None
    return dep


def _replica_sets(kubectl, ns: str) -> list[dict[str, Any]]:
    return (get(kubectl, "replicasets", "-n", ns) or {}).get("items", [])


def test_install_creates_the_operator_and_its_rbac(helm: Helm, kubectl, release: tuple[str, str]) -> None:
    name, ns = release
    # --wait: the Deployment becomes available, so the restricted profile admitted its pod.
    helm.install(name, ns, "--wait", "--timeout", "120s")
    full = f"{name}-llamaops"
    dep = _deployment(kubectl, name, ns)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == full
    assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    assert get(kubectl, "serviceaccount", full, "-n", ns) is not None
    assert get(kubectl, "service", f"{full}-metrics", "-n", ns) is not None
    role = get(kubectl, "clusterrole", full)
    assert role is not None and role["rules"]
    binding = get(kubectl, "clusterrolebinding", full)
    assert binding["roleRef"]["name"] == full
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": full, "namespace": ns}]
    pods = (get(kubectl, "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={name}") or {})["items"]
    assert len(pods) == 1 and pods[0]["status"]["phase"] == "Running"
    for crd in ("llamafinetunes.llamaops.io", "llamaserves.llamaops.io"):
        assert get(kubectl, "crd", crd) is not None


def test_upgrade_with_changed_values_rolls_the_deployment(helm: Helm, kubectl, release: tuple[str, str]) -> None:
    name, ns = release
    before = _deployment(kubectl, name, ns)
    old_sets = {rs["metadata"]["name"] for rs in _replica_sets(kubectl, ns)}
    helm("upgrade", name, str(CHART), "--namespace", ns, "--reuse-values",
         "--set", "trainer.image=registry.example/llamaops-trainer:9.9.9", "--set", "queue.backfillLimit=5",
         "--wait", "--timeout", "120s")
    after = _deployment(kubectl, name, ns)
    assert after["metadata"]["generation"] > before["metadata"]["generation"]
    env = {e["name"]: e.get("value") for e in after["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLAMAOPS_TRAINER_IMAGE"] == "registry.example/llamaops-trainer:9.9.9"
    assert env["LLAMAOPS_BACKFILL_LIMIT"] == "5"
    new_sets = wait_until(lambda: {rs["metadata"]["name"] for rs in _replica_sets(kubectl, ns)} - old_sets,
                          "a new ReplicaSet")
    assert len(new_sets) == 1
    # Recreate: the old ReplicaSet is scaled to zero.
    for rs in _replica_sets(kubectl, ns):
        if rs["metadata"]["name"] in old_sets:
            assert rs["spec"]["replicas"] == 0


def test_schema_refuses_bad_values_naming_them(helm: Helm, kubectl, tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(yaml.safe_dump({"queue": {"mode": "fifo"}, "metrics": {"port": 0}}))
    name, ns = f"bad-{secrets.token_hex(3)}", "default"
    proc = helm.install(name, ns, "-f", str(bad), check=False)
    assert proc.returncode != 0
    assert "/queue/mode" in proc.stderr and "'builtin', 'kueue'" in proc.stderr, proc.stderr
    assert "/metrics/port" in proc.stderr, proc.stderr
    assert helm("status", name, "--namespace", ns, check=False).returncode != 0  # nothing was installed


def test_uninstall_keeps_the_crds_and_the_users_objects(helm: Helm, kubectl, release: tuple[str, str],
                                                        namespace: str) -> None:
    name, ns = release
    run = yaml.safe_load((REPO / "examples" / "llama-3.1-8b-lora.yaml").read_text())
    run["metadata"] = {"name": "keep-me", "namespace": namespace}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(run))
    helm("uninstall", name, "--namespace", ns, "--wait", "--timeout", "120s")
    full = f"{name}-llamaops"
    assert get(kubectl, "deployment", full, "-n", ns) is None
    assert get(kubectl, "clusterrole", full) is None and get(kubectl, "clusterrolebinding", full) is None
    assert get(kubectl, "serviceaccount", full, "-n", ns) is None
    for crd in ("llamafinetunes.llamaops.io", "llamaserves.llamaops.io"):
        obj = get(kubectl, "crd", crd)
        assert obj is not None and "deletionTimestamp" not in obj["metadata"]
    lft = get(kubectl, "lft", "keep-me", "-n", namespace)
    assert lft is not None and "deletionTimestamp" not in lft["metadata"]
