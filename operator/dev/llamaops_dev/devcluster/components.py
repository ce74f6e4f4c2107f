"""Command lines of the control-plane components and their health endpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from llamaops_dev.devcluster import kubeconfig, kwok_stages
from llamaops_dev.devcluster.config import CORE_COMPONENTS, OPTIONAL_COMPONENTS, ClusterConfig, StateDir
from llamaops_dev.devcluster.net import HOST
from llamaops_dev.devcluster.nodes import KWOK_NODE_SELECTOR
from llamaops_dev.devcluster.pki import SERVICE_CLUSTER_IP_RANGE, PKIPaths
from llamaops_dev.devcluster.processes import ProcessSpec

# Every component there is, in start order (optional ones run only when the
# configuration asks for them: `ClusterConfig.components()`).
COMPONENTS = CORE_COMPONENTS + OPTIONAL_COMPONENTS
# Stop order: each group goes down before the next is signalled.
STOP_PHASES = (("kueue", "kwok", "kube-scheduler", "kube-controller-manager"), ("kube-apiserver",), ("etcd",))
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl")

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Pod IPs kwok hands out.
POD_CIDR = "10.244.0.0/16"
# kwok renews each node's Lease at a quarter of this, the node controller
# reads node health from the Lease.
NODE_LEASE_SECONDS = 40


@dataclass(frozen=True)
class Health:
    """How to tell a component is serving: an http(s) URL answering 200."""

    url: str


def apiserver_url(config: ClusterConfig) -> str:
    return f"https://{HOST}:{config.ports.apiserver}"


def health(component: str, config: ClusterConfig) -> Health:
    p = config.ports
    return {
        "etcd": Health(f"http://{HOST}:{p.etcd}/health"),
        "kube-apiserver": Health(f"https://{HOST}:{p.apiserver}/readyz"),
        "kube-controller-manager": Health(f"https://{HOST}:{p.controller_manager}/healthz"),
        "kube-scheduler": Health(f"https://{HOST}:{p.scheduler}/healthz"),
        "kwok": Health(f"http://{HOST}:{p.kwok}/healthz"),
        # Ready once its webhook server serves (controller-runtime's readyz).
        "kueue": Health(f"http://{HOST}:{p.kueue_health}/readyz"),
    }[component]


def write_component_files(state: StateDir, config: ClusterConfig, pki: PKIPaths) -> None:
    """Kubeconfigs of the components, the scheduler's and kwok's config files."""
    d = state.component_configs
    d.mkdir(parents=True, exist_ok=True)
    server = apiserver_url(config)
    for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
        kubeconfig.write(d / f"{name}.kubeconfig", server, pki.ca_cert, pki.client_cert(name), pki.client_key(name), name)
    (d / "kube-scheduler.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubescheduler.config.k8s.io/v1",
                "kind": "KubeSchedulerConfiguration",
                "clientConnection": {"kubeconfig": str(d / "kube-scheduler.kubeconfig")},
                "leaderElection": {"leaderElect": False},
            },
            sort_keys=False,
        )
    )
    kwok_conf = yaml.safe_dump(
        {
            "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
            "kind": "KwokConfiguration",
            # A config file's options get no defaults for the parallelism
            # settings; these are the values of kwok's own kwok.yaml.
            "options": {
                "cidr": POD_CIDR,
                "nodeLeaseDurationSeconds": NODE_LEASE_SECONDS,
                "nodeLeaseParallelism": 4,
                "podPlayStageParallelism": 4,
                "nodePlayStageParallelism": 4,
                "podsOnNodeSyncParallelism": 1,
            },
        },
        sort_keys=False,
    )
    (d / "kwok.yaml").write_text(kwok_conf + kwok_stages.STAGES_YAML)


def specs(state: StateDir, config: ClusterConfig, pki: PKIPaths, bin_dir: Path) -> dict[str, ProcessSpec]:
    p = config.ports
    d = state.component_configs
    b = lambda name: str(bin_dir / name)  # noqa: E731
    etcd_client = f"http://{HOST}:{p.etcd}"
    etcd_peer = f"http://{HOST}:{p.etcd_peer}"
    return {
        "etcd": ProcessSpec(
            "etcd",
            [
                b("etcd"),
                "--name=llamaops-dev",
                f"--data-dir={state.etcd_data}",
                f"--listen-client-urls={etcd_client}",
                f"--advertise-client-urls={etcd_client}",
                f"--listen-peer-urls={etcd_peer}",
                f"--initial-advertise-peer-urls={etcd_peer}",
                f"--initial-cluster=llamaops-dev={etcd_peer}",
                "--initial-cluster-state=new",
                # A throwaway store: every `up` starts from an empty one.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        ),
        "kube-apiserver": ProcessSpec(
            "kube-apiserver",
            [
                b("kube-apiserver"),
                f"--advertise-address={HOST}",
                f"--bind-address={HOST}",
                f"--secure-port={p.apiserver}",
                f"--etcd-servers={etcd_client}",
                f"--tls-cert-file={pki.apiserver_cert}",
                f"--tls-private-key-file={pki.apiserver_key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                # Endpoints may not hold a loopback address, so the built-in
                # reconciler would fail every 10s; nothing routes the service
                # IP here anyway.
                "--endpoint-reconciler-type=none",
                f"--cert-dir={d / 'kube-apiserver-certs'}",
            ],
        ),
        "kube-controller-manager": ProcessSpec(
            "kube-controller-manager",
            [
                b("kube-controller-manager"),
                f"--kubeconfig={d / 'kube-controller-manager.kubeconfig'}",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_cert}",
                "--use-service-account-credentials=true",
                "--controllers=*",
                "--cluster-name=llamaops-dev",
                f"--bind-address={HOST}",
                f"--secure-port={p.controller_manager}",
                f"--cert-dir={d / 'kube-controller-manager-certs'}",
                # Its default is a system directory it would create.
                f"--flex-volume-plugin-dir={d / 'flexvolume'}",
            ],
        ),
        "kube-scheduler": ProcessSpec(
            "kube-scheduler",
            [
                b("kube-scheduler"),
                f"--config={d / 'kube-scheduler.yaml'}",
                f"--bind-address={HOST}",
                f"--secure-port={p.scheduler}",
                f"--cert-dir={d / 'kube-scheduler-certs'}",
            ],
        ),
        "kwok": ProcessSpec(
            "kwok",
            [
                b("kwok"),
                f"--kubeconfig={d / 'kwok.kubeconfig'}",
                f"--config={d / 'kwok.yaml'}",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_SELECTOR}",
                f"--server-address={HOST}:{p.kwok}",
            ],
            # kwok also reads $KWOK_WORKDIR/kwok.yaml (default ~/.kwok); keep a
            # user's own kwok setup out of this cluster.
            env={"KWOK_WORKDIR": str(d / "kwok-workdir")},
        ),
    }


# What kwok may do: the core and coordination rules of kwok's own
# kustomize/rbac/role.yaml (the kwok.x-k8s.io CRDs are not used here).
KWOK_CLUSTER_ROLE = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRole",
    "metadata": {"name": "llamaops:kwok-controller"},
    "rules": [
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes/status", "pods/status"], "verbs": ["patch", "update"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete", "get", "list", "patch", "update", "watch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create", "get", "list", "patch", "update", "watch"]},
    ],
}

KWOK_CLUSTER_ROLE_BINDING = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRoleBinding",
    "metadata": {"name": "llamaops:kwok-controller"},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "llamaops:kwok-controller"},
    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "kwok-controller"}],
}
