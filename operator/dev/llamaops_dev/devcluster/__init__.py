"""A local Kubernetes control plane for development and tests.

Real etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as
local processes; kwok simulates the nodes (GPU nodes by default), so
Deployments become Available and Jobs complete without a kubelet. With
`ClusterConfig(kueue=True)` Kueue runs too (see `llamaops_dev.devcluster.kueue`).

    from llamaops_dev.devcluster import DevCluster
    kubeconfig = DevCluster().up()
    ...
    DevCluster().down()
"""

from __future__ import annotations

from llamaops_dev.devcluster.cluster import ComponentState, DevCluster
from llamaops_dev.devcluster.config import ClusterConfig, NodePools, Ports
from llamaops_dev.devcluster.errors import DevClusterError

__all__ = ["ClusterConfig", "ComponentState", "DevCluster", "DevClusterError", "NodePools", "Ports"]
