"""A local Kubernetes control plane for development and tests.

Real etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as
local processes; kwok simulates the nodes (GPU nodes by default), so
Deployments become Available and Jobs complete without a kubelet. With
`ClusterConfig(kueue=True)` Kueue runs too (see `llamaops.devcluster.kueue`).

    from llamaops.devcluster import DevCluster
    kubeconfig = DevCluster().up()
    ...
    DevCluster().down()
"""

from __future__ import annotations

from llamaops.devcluster.cluster import ComponentState, DevCluster
from llamaops.devcluster.config import ClusterConfig, NodePools, Ports
from llamaops.devcluster.errors import DevClusterError

__all__ = ["ClusterConfig", "ComponentState", "DevCluster", "DevClusterError", "NodePools", "Ports"]
