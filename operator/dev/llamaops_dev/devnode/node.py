"""The Node object of the dev node, and its heartbeat (node Lease + Ready condition)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

from llamaops_dev.devnode import NODE_LABEL, NODE_TAINT
from llamaops_dev.devnode.env import LOCALHOST
from llamaops_dev.devnode.status import now

LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40  # the kubelet's default; renewed every LEASE_SECONDS / 4
AGENT_VERSION = "v0.0.0-llamaops-devnode"


def host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


@dataclass(frozen=True)
class NodeConfig:
    name: str = "local-cpu"
    cpu: str = ""  # default: this machine's CPUs
    memory: str = ""  # default: this machine's memory
    pods: int = 32

    def capacity(self) -> dict[str, str]:
        return {"cpu": self.cpu or str(os.cpu_count() or 1),
                "memory": self.memory or f"{host_memory_bytes() // (1 << 20)}Mi",
                "pods": str(self.pods), "ephemeral-storage": "100Gi"}


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def conditions(ready: bool = True, since: str | None = None) -> list[dict[str, Any]]:
    t = now()
    pressure = [
        {"type": kind, "status": "False", "reason": f"KubeletHas{ok}", "message": f"dev node has {ok.lower()}",
         "lastHeartbeatTime": t, "lastTransitionTime": since or t}
        for kind, ok in (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"),
                         ("PIDPressure", "SufficientPID"))
    ]
    return [*pressure, {"type": "Ready", "status": "True" if ready else "False",
                        "reason": "KubeletReady" if ready else "KubeletNotReady",
                        "message": "llamaops dev node agent is posting ready status" if ready else "agent stopped",
                        "lastHeartbeatTime": t, "lastTransitionTime": since or t}]


def node_status(config: NodeConfig, ready: bool = True) -> dict[str, Any]:
    capacity = config.capacity()
    return {
        "capacity": capacity, "allocatable": capacity,
        "conditions": conditions(ready),
        "addresses": [{"type": "InternalIP", "address": LOCALHOST}, {"type": "Hostname", "address": config.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": platform.release(),
                     "osImage": "llamaops dev node (pods run as local processes)",
                     "containerRuntimeVersion": "devnode://0", "kubeletVersion": AGENT_VERSION,
                     "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": _arch()},
    }


def node_manifest(config: NodeConfig) -> dict[str, Any]:
    """No kwok annotation: kwok manages only nodes it is told to, this one is the agent's."""
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": config.name, "labels": {
            "kubernetes.io/hostname": config.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": _arch(),
            "type": "devnode", NODE_LABEL: "true"}},
        "spec": {"taints": [dict(NODE_TAINT)]},
        "status": node_status(config),
    }


def lease_manifest(config: NodeConfig, uid: str | None = None) -> dict[str, Any]:
    owner = [{"apiVersion": "v1", "kind": "Node", "name": config.name, "uid": uid}] if uid else []
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": config.name, "namespace": LEASE_NAMESPACE, "ownerReferences": owner},
        "spec": {"holderIdentity": config.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()},
    }


def micro_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
