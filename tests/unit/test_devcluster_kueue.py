"""Kueue on the dev cluster: its configuration, RBAC, queue manifests and the
`--kueue` option, without running anything."""

from __future__ import annotations

import pytest
import yaml
from llamaops.cli import app
from llamaops_dev.devcluster import ClusterConfig, DevClusterError, NodePools, Ports, kueue
from llamaops_dev.devcluster.config import StateDir
from typer.testing import CliRunner

ROLE = """\
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: manager-role
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
"""
SECRETS_ROLE = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: manager-secrets-role
  namespace: system
rules:
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, update]
"""


def kueue_files(bin_dir):
    (bin_dir / "kueue").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "kueue").chmod(0o755)
    (bin_dir / kueue.CRD_DIR).mkdir()
    (bin_dir / kueue.CRD_DIR / "kueue.x-k8s.io_workloads.yaml").write_text(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: workloads.kueue.x-k8s.io}\n"
    )
    (bin_dir / kueue.RBAC_DIR).mkdir()
    (bin_dir / kueue.RBAC_DIR / "role.yaml").write_text(ROLE)
    (bin_dir / kueue.RBAC_DIR / "manager_secrets_role.yaml").write_text(SECRETS_ROLE)


def test_default_quota_covers_the_gpu_nodes():
    assert kueue.gpu_quota() == {"cpu": "192", "memory": "2Ti", "nvidia.com/gpu": "16"}
    assert kueue.gpu_quota(NodePools(gpu_nodes=3, gpus_per_node=4)) == {"cpu": "288", "memory": "3Ti", "nvidia.com/gpu": "12"}


def test_default_queues():
    flavor, cq, lq = kueue.default_queues("team-a")
    assert [o["kind"] for o in (flavor, cq, lq)] == ["ResourceFlavor", "ClusterQueue", "LocalQueue"]
    assert {o["apiVersion"] for o in (flavor, cq, lq)} == {"kueue.x-k8s.io/v1beta2"}
    assert flavor["spec"]["nodeLabels"] == {"nvidia.com/gpu.present": "true"}
    assert cq["spec"]["namespaceSelector"] == {}
    (group,) = cq["spec"]["resourceGroups"]
    assert group["coveredResources"] == ["cpu", "memory", "nvidia.com/gpu"]
    (f,) = group["flavors"]
    assert f["name"] == flavor["metadata"]["name"]
    assert {r["name"]: r["nominalQuota"] for r in f["resources"]} == kueue.gpu_quota()
    assert lq["metadata"] == {"name": "default", "namespace": "team-a"}
    assert lq["spec"]["clusterQueue"] == cq["metadata"]["name"]


def test_configuration(tmp_path):
    state = StateDir(tmp_path)
    config = ClusterConfig(ports=Ports().shifted(3), kueue=True)
    c = kueue.configuration(state, config)
    assert c["internalCertManagement"] == {"enable": False}
    assert c["leaderElection"] == {"leaderElect": False}
    assert c["manageJobsWithoutQueueName"] is False
    assert c["integrations"]["frameworks"] == ["batch/job"]
    assert c["featureGates"] == {"VisibilityOnDemand": False}
    assert c["health"]["healthProbeBindAddress"] == f"127.0.0.1:{config.ports.kueue_health}"
    assert c["metrics"]["bindAddress"] == f"127.0.0.1:{config.ports.kueue_metrics}"
    assert c["webhook"] == {"host": "127.0.0.1", "port": config.ports.kueue_webhook, "certDir": str(kueue.cert_dir(state))}
    spec = kueue.spec(state, tmp_path / "bin")
    assert spec.env == {kueue.METRICS_CERT_DIR_ENV: str(kueue.cert_dir(state))}
    assert f"--config={kueue.config_file(state)}" in spec.argv


def test_rbac_is_renamed_and_bound(tmp_path):
    kueue_files(tmp_path)
    objs = {(o["kind"], o["metadata"]["name"]): o for o in kueue.rbac(tmp_path)}
    assert set(objs) == {
        ("ClusterRole", "llamaops:kueue-manager-role"),
        ("ClusterRoleBinding", "llamaops:kueue-manager-role"),
        ("Role", "llamaops:kueue-manager-secrets-role"),
        ("RoleBinding", "llamaops:kueue-manager-secrets-role"),
    }
    role = objs[("Role", "llamaops:kueue-manager-secrets-role")]
    assert role["metadata"]["namespace"] == "kueue-system"
    assert role["rules"][0]["resources"] == ["secrets"]
    binding = objs[("ClusterRoleBinding", "llamaops:kueue-manager-role")]
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "llamaops-kueue"}]
    assert binding["roleRef"]["name"] == "llamaops:kueue-manager-role"


def test_missing_kueue_files(tmp_path):
    assert kueue.missing(tmp_path) == ["kueue", "kueue-crds/*.yaml", "kueue-rbac/role.yaml"]
    with pytest.raises(DevClusterError, match="hack/build-binaries.sh"):
        kueue.check_binaries(tmp_path)
    kueue_files(tmp_path)
    assert kueue.missing(tmp_path) == []
    assert [c["metadata"]["name"] for c in kueue.crds(tmp_path)] == ["workloads.kueue.x-k8s.io"]


def test_up_kueue_without_kueue_binaries_fails_before_starting_anything(env):
    result = CliRunner().invoke(app, ["dev-cluster", "up", "--kueue"])
    assert result.exit_code == 1
    assert "lacks kueue" in result.output
    assert not (env / "dev-cluster" / "run").exists()


def test_kueue_option_is_remembered(env, stub_bin):
    kueue_files(stub_bin)
    # The stub etcd exits at once, but the configuration is written first.
    result = CliRunner().invoke(app, ["dev-cluster", "up", "--kueue", "--port-offset", "790"])
    assert result.exit_code == 1
    assert "etcd exited" in result.output
    saved = yaml.safe_load((env / "dev-cluster" / "config.yaml").read_text())
    assert saved["kueue"] is True
    assert saved["ports"]["kueue_health"] == Ports.kueue_health + 790
    assert not list((env / "dev-cluster" / "run").glob("*.pid"))
