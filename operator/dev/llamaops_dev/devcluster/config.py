"""What a dev cluster looks like (ports, simulated nodes) and where its state lives."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llamaops_dev.devcluster.errors import DevClusterError

CONFIG_VERSION = 1


def default_home() -> Path:
    """`$LLAMAOPS_HOME`, else `~/.llamaops`."""
    env = os.environ.get("LLAMAOPS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".llamaops"


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the control plane.

    The defaults stay clear of the well-known ports of a real cluster on the
    same machine (6443, 2379/2380, 10250-10259), so both can run side by side.
    """

    apiserver: int = 16443
    etcd: int = 12379
    etcd_peer: int = 12380
    controller_manager: int = 16257
    scheduler: int = 16259
    kwok: int = 16247
    # Kueue (`up --kueue` only): health probes, webhook server, metrics.
    kueue_health: int = 16261
    kueue_webhook: int = 16263
    kueue_metrics: int = 16265

    def shifted(self, offset: int) -> Ports:
        """Every port moved by `offset`: a second cluster next to the first."""
        return Ports(**{f.name: getattr(self, f.name) + offset for f in dataclasses.fields(self)})

    def by_component(self) -> dict[str, list[int]]:
        """The ports each component listens on."""
        return {
            "etcd": [self.etcd, self.etcd_peer],
            "kube-apiserver": [self.apiserver],
            "kube-controller-manager": [self.controller_manager],
            "kube-scheduler": [self.scheduler],
            "kwok": [self.kwok],
            "kueue": [self.kueue_health, self.kueue_webhook, self.kueue_metrics],
        }

    def validate(self) -> None:
        seen: dict[int, str] = {}
        for f in dataclasses.fields(self):
            port = getattr(self, f.name)
            if not 1 <= port <= 65535:
                raise DevClusterError(f"port {port} for {f.name} is not in 1-65535")
            if port in seen:
                raise DevClusterError(f"port {port} is given to both {seen[port]} and {f.name}")
            seen[port] = f.name


@dataclass(frozen=True)
class NodePools:
    """The simulated nodes: GPU nodes and CPU-only nodes, all managed by kwok."""

    gpu_nodes: int = 2
    gpus_per_node: int = 8
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    gpu_memory_mib: int = 81559
    cpu_nodes: int = 1

    def validate(self) -> None:
        if self.gpu_nodes < 0 or self.cpu_nodes < 0:
            raise DevClusterError("node counts must not be negative")
        if self.gpu_nodes + self.cpu_nodes == 0:
            raise DevClusterError("the cluster needs at least one node")
        if self.gpu_nodes and self.gpus_per_node < 1:
            raise DevClusterError("--gpus-per-node must be at least 1")
        if self.gpu_memory_mib < 0:
            raise DevClusterError("--gpu-memory must not be negative")


# The core components, in start order; optional ones come after them.
CORE_COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
OPTIONAL_COMPONENTS = ("kueue",)


@dataclass(frozen=True)
class ClusterConfig:
    ports: Ports = field(default_factory=Ports)
    nodes: NodePools = field(default_factory=NodePools)
    # Also run Kueue (its CRDs and controller manager) once the core is Ready.
    kueue: bool = False

    def validate(self) -> None:
        self.ports.validate()
        self.nodes.validate()

    def components(self) -> tuple[str, ...]:
        """The components this configuration runs, in start order."""
        return CORE_COMPONENTS + (("kueue",) if self.kueue else ())

    def component_ports(self) -> dict[str, list[int]]:
        """The ports of the components this configuration runs."""
        by_component = self.ports.by_component()
        return {name: by_component[name] for name in self.components()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "ports": dataclasses.asdict(self.ports),
            "nodes": dataclasses.asdict(self.nodes),
            "kueue": self.kueue,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        try:
            return cls(
                ports=Ports(**(data.get("ports") or {})),
                nodes=NodePools(**(data.get("nodes") or {})),
                kueue=bool(data.get("kueue", False)),
            )
        except TypeError as exc:
            raise DevClusterError(f"unrecognised dev cluster config: {exc}") from exc

    def with_overrides(
        self, *, ports: dict[str, int] | None = None, nodes: dict[str, Any] | None = None, kueue: bool | None = None
    ) -> ClusterConfig:
        """A copy with the given fields replaced; `None` values are left alone."""
        p = {k: v for k, v in (ports or {}).items() if v is not None}
        n = {k: v for k, v in (nodes or {}).items() if v is not None}
        return ClusterConfig(
            ports=dataclasses.replace(self.ports, **p),
            nodes=dataclasses.replace(self.nodes, **n),
            kueue=self.kueue if kueue is None else kueue,
        )


class StateDir:
    """The files of one dev cluster under `<home>/dev-cluster`."""

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.root = self.home / "dev-cluster"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def component_configs(self) -> Path:
        """Kubeconfigs and config files of the components."""
        return self.root / "components"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def log_file(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def pid_file(self, component: str) -> Path:
        return self.run / f"{component}.pid"

    def load_config(self) -> ClusterConfig | None:
        if not self.config_file.exists():
            return None
        try:
            data = yaml.safe_load(self.config_file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DevClusterError(f"{self.config_file} is not valid YAML: {exc}") from exc
        return ClusterConfig.from_dict(data)

    def save_config(self, config: ClusterConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text("# Written by `llamaops dev-cluster up`; options given to `up` override it.\n" + yaml.safe_dump(config.to_dict(), sort_keys=False))
        tmp.replace(self.config_file)
