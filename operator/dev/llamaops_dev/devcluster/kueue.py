"""Kueue on the dev cluster (`llamaops dev-cluster up --kueue`), and manifests
of the queues a test needs.

Kueue's controller manager runs as one more local process, as the user
`llamaops-kueue` with Kueue's own ClusterRole (from its release manifests),
configured by a file in the state directory:

- no internal certificate management: its webhook and metrics servers serve a
  certificate for 127.0.0.1 issued by the cluster CA. The metrics server reads
  it from a fixed path in upstream Kueue; hack/build-binaries.sh builds the
  manager with that path taken from $LLAMAOPS_KUEUE_METRICS_CERT_DIR.
- its webhooks are not registered with the API server (nothing could route
  them to a local process under its Service name), so nothing suspends or
  defaults a Job on creation: a Job for Kueue is created with `suspend: true`
  and the label `kueue.x-k8s.io/queue-name: <LocalQueue>`; Kueue creates its
  Workload and unsuspends it on admission, adding the flavor's node labels to
  its pods' nodeSelector.
- only the batch/job integration; no leader election; no visibility server.

Its CRDs (v1beta2 stored, v1beta1 served without a conversion webhook) are
applied server-side: the Workload CRD is too large for client-side apply's
last-applied annotation.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from llamaops.api.constants import KUEUE_QUEUE_LABEL

from llamaops_dev.devcluster import kubeconfig, pki
from llamaops_dev.devcluster.config import ClusterConfig, NodePools, StateDir
from llamaops_dev.devcluster.errors import DevClusterError
from llamaops_dev.devcluster.net import HOST, APIClient, APIError
from llamaops_dev.devcluster.nodes import GPU_NODE_RESOURCES, GPU_RESOURCE
from llamaops_dev.devcluster.processes import ProcessSpec

NAMESPACE = "kueue-system"
IDENTITY = pki.ClientIdentity("llamaops-kueue")
USER = IDENTITY.common_name
GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
QUEUE_NAME_LABEL = KUEUE_QUEUE_LABEL  # what a Job names its LocalQueue with
# Where hack/build-binaries.sh puts Kueue's manifests, beside the binaries.
CRD_DIR = "kueue-crds"
RBAC_DIR = "kueue-rbac"
BINARY = "kueue"
METRICS_CERT_DIR_ENV = "LLAMAOPS_KUEUE_METRICS_CERT_DIR"
FIELD_MANAGER = "llamaops-dev-cluster"
RBAC_PREFIX = "llamaops:kueue-"
# The simulated GPU nodes carry the label GPU feature discovery sets on real ones.
GPU_NODE_LABELS = {"nvidia.com/gpu.present": "true"}

# --------------------------------------------------------------- binaries


def missing(bin_dir: Path) -> list[str]:
    """What `bin_dir` lacks for Kueue: the binary, its CRDs, its RBAC roles."""
    out = []
    if not (bin_dir / BINARY).is_file():
        out.append(BINARY)
    if not list((bin_dir / CRD_DIR).glob("*.yaml")):
        out.append(f"{CRD_DIR}/*.yaml")
    if not (bin_dir / RBAC_DIR / "role.yaml").is_file():
        out.append(f"{RBAC_DIR}/role.yaml")
    return out


def check_binaries(bin_dir: Path) -> None:
    lacking = missing(bin_dir)
    if lacking:
        raise DevClusterError(
            f"binary directory {bin_dir} lacks {', '.join(lacking)}, which `--kueue` needs; "
            "hack/build-binaries.sh builds them (KUEUE_VERSION in hack/versions.env)"
        )


# ------------------------------------------------------------ state files


def cert_dir(state: StateDir) -> Path:
    """tls.crt and tls.key of its webhook and metrics servers."""
    return state.component_configs / "kueue-certs"


def config_file(state: StateDir) -> Path:
    return state.component_configs / "kueue.yaml"


def kubeconfig_file(state: StateDir) -> Path:
    return state.component_configs / "kueue.kubeconfig"


def configuration(state: StateDir, config: ClusterConfig) -> dict[str, Any]:
    """Kueue's Configuration (config.kueue.x-k8s.io/v1beta2) for this cluster."""
    p = config.ports
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "manageJobsWithoutQueueName": False,
        "internalCertManagement": {"enable": False},
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"{HOST}:{p.kueue_health}"},
        "metrics": {"bindAddress": f"{HOST}:{p.kueue_metrics}"},
        "webhook": {"host": HOST, "port": p.kueue_webhook, "certDir": str(cert_dir(state))},
        "integrations": {"frameworks": ["batch/job"]},
        # The visibility server is an aggregated API server: nothing here
        # would route the API server to it.
        "featureGates": {"VisibilityOnDemand": False},
    }


def write_files(state: StateDir, config: ClusterConfig, paths: pki.PKIPaths, server: str) -> None:
    """Its client certificate and kubeconfig, serving certificate and configuration file."""
    pki.issue_client_cert(paths, "kueue", IDENTITY)
    kubeconfig.write(kubeconfig_file(state), server, paths.ca_cert, paths.client_cert("kueue"), paths.client_key("kueue"), USER)
    certs = cert_dir(state)
    pki.issue_serving_cert(paths, "llamaops-kueue", certs / "tls.crt", certs / "tls.key")
    config_file(state).write_text(yaml.safe_dump(configuration(state, config), sort_keys=False))


def spec(state: StateDir, bin_dir: Path) -> ProcessSpec:
    return ProcessSpec(
        "kueue",
        [str(bin_dir / BINARY), f"--config={config_file(state)}", f"--kubeconfig={kubeconfig_file(state)}"],
        env={METRICS_CERT_DIR_ENV: str(cert_dir(state))},
    )


# ------------------------------------------------------- API server objects


def crds(bin_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((bin_dir / CRD_DIR).glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "CustomResourceDefinition"]
    return out


def rbac(bin_dir: Path) -> list[dict[str, Any]]:
    """Kueue's manager roles, renamed, with bindings to USER.

    ClusterRoles stay cluster-wide; Roles (its Secrets role) land in NAMESPACE.
    """
    out: list[dict[str, Any]] = []
    subject = [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]
    for path in sorted((bin_dir / RBAC_DIR).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in ("ClusterRole", "Role"):
                continue
            kind = doc["kind"]
            name = RBAC_PREFIX + doc["metadata"]["name"]
            meta: dict[str, Any] = {"name": name}
            if kind == "Role":
                meta["namespace"] = NAMESPACE
            out.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "rules": doc.get("rules") or []})
            out.append(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": f"{kind}Binding",
                    "metadata": dict(meta),
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
                    "subjects": subject,
                }
            )
    return out


def _collection(obj: Mapping[str, Any]) -> str:
    kind = obj["kind"]
    ns = obj["metadata"].get("namespace")
    plural = {"ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings", "Role": "roles", "RoleBinding": "rolebindings"}[kind]
    if ns:
        return f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/{plural}"
    return f"/apis/rbac.authorization.k8s.io/v1/{plural}"


def apply_crds(client: APIClient, docs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Server-side apply each CRD; returns their names."""
    names = []
    for crd in docs:
        name = crd["metadata"]["name"]
        client.call(
            "PATCH",
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}?fieldManager={FIELD_MANAGER}&force=true",
            crd,
            content_type="application/apply-patch+yaml",
        )
        names.append(name)
    return names


def crds_established(client: APIClient, names: Iterable[str]) -> bool:
    for name in names:
        try:
            crd = client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        except APIError:
            return False
        conditions = (crd.get("status") or {}).get("conditions") or []
        if not any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
            return False
    return True


def install(client: APIClient, bin_dir: Path) -> list[str]:
    """Kueue's CRDs, its namespace and its RBAC; returns the CRD names."""
    names = apply_crds(client, crds(bin_dir))
    status, body = client.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    if status not in (200, 201, 409):
        raise APIError(status, body)
    for obj in rbac(bin_dir):
        client.create_or_replace(_collection(obj), obj)
    return names


# ---------------------------------------------------------------- queues


def _times(quantity: str, n: int) -> str:
    """`n` times a quantity such as "96" or "1Ti"."""
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity)
    if not m:
        raise ValueError(f"cannot scale quantity {quantity!r}")
    return f"{int(m.group(1)) * n}{m.group(2)}"


def gpu_quota(pools: NodePools | None = None) -> dict[str, str]:
    """cpu, memory and nvidia.com/gpu of all simulated GPU nodes together."""
    pools = pools or NodePools()
    n = pools.gpu_nodes
    return {
        "cpu": _times(GPU_NODE_RESOURCES["cpu"], n),
        "memory": _times(GPU_NODE_RESOURCES["memory"], n),
        GPU_RESOURCE: str(n * pools.gpus_per_node),
    }


def resource_flavor(name: str, node_labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A ResourceFlavor; Kueue adds `node_labels` to the nodeSelector of the pods it admits."""
    spec: dict[str, Any] = {}
    if node_labels:
        spec["nodeLabels"] = dict(node_labels)
    return {"apiVersion": API_VERSION, "kind": "ResourceFlavor", "metadata": {"name": name}, "spec": spec}


def cluster_queue(name: str, flavor: str, quota: Mapping[str, str], *, namespace_selector: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ClusterQueue with one flavor and a nominal quota per resource; all
    namespaces may use it unless `namespace_selector` narrows that."""
    return {
        "apiVersion": API_VERSION,
        "kind": "ClusterQueue",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": dict(namespace_selector or {}),
            "resourceGroups": [
                {
                    "coveredResources": list(quota),
                    "flavors": [{"name": flavor, "resources": [{"name": r, "nominalQuota": q} for r, q in quota.items()]}],
                }
            ],
        },
    }


def local_queue(name: str, namespace: str, cluster_queue_name: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterQueue": cluster_queue_name},
    }


def default_queues(
    namespace: str,
    *,
    quota: Mapping[str, str] | None = None,
    flavor: str = "llamaops-gpu",
    cluster_queue_name: str = "llamaops",
    local_queue_name: str = "default",
    node_labels: Mapping[str, str] | None = GPU_NODE_LABELS,
) -> list[dict[str, Any]]:
    """ResourceFlavor, ClusterQueue and LocalQueue: by default the flavor of
    the GPU nodes and a quota covering all simulated GPU nodes."""
    return [
        resource_flavor(flavor, node_labels),
        cluster_queue(cluster_queue_name, flavor, quota or gpu_quota()),
        local_queue(local_queue_name, namespace, cluster_queue_name),
    ]


PLURALS = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues", "LocalQueue": "localqueues", "Workload": "workloads"}


def create_default_queues(api_client: Any, namespace: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Create (or replace) `default_queues(namespace, **kwargs)` with a
    `kubernetes.client.ApiClient` (the `kubernetes` package, a test
    dependency); returns the objects as stored."""
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    api = k8s.CustomObjectsApi(api_client)
    out = []
    for obj in default_queues(namespace, **kwargs):
        plural = PLURALS[obj["kind"]]
        name = obj["metadata"]["name"]
        ns = obj["metadata"].get("namespace")
        try:
            if ns:
                out.append(api.create_namespaced_custom_object(GROUP, VERSION, ns, plural, obj))
            else:
                out.append(api.create_cluster_custom_object(GROUP, VERSION, plural, obj))
        except ApiException as exc:
            if exc.status != 409:
                raise
            if ns:
                current = api.get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)
                obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                out.append(api.replace_namespaced_custom_object(GROUP, VERSION, ns, plural, name, obj))
            else:
                current = api.get_cluster_custom_object(GROUP, VERSION, plural, name)
                obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                out.append(api.replace_cluster_custom_object(GROUP, VERSION, plural, name, obj))
    return out


def wait_cluster_queue_active(api_client: Any, name: str, timeout: float = 60.0) -> None:
    """Until Kueue reports the ClusterQueue Active (its flavors exist, Kueue saw it)."""
    from kubernetes import client as k8s

    api = k8s.CustomObjectsApi(api_client)
    deadline = time.monotonic() + timeout
    while True:
        cq = api.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", name)
        conditions = (cq.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Active" and c.get("status") == "True" for c in conditions):
            return
        if time.monotonic() > deadline:
            raise DevClusterError(f"ClusterQueue {name} not Active after {timeout:.0f}s: {conditions}")
        time.sleep(0.2)
