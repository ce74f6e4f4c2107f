"""The serving-runtime seam: what a runtime contributes to a LlamaServe's workload, and the registry of runtimes.

The workload (builders/serve/workload.py) is the same for every runtime: a
Deployment rolled out without lost capacity, a Service, the adapters'
volumes, an optional PodDisruptionBudget and autoscaler. A runtime adds its
server: the command and arguments, its environment, port and probes, the
files it reads (one ConfigMap), where its model cache lives, how many GPUs a
replica takes, and the checks of its own spec section (`vllm:`, `ollama:`).

Adding a runtime is one module that calls `register` at import, plus the line
that imports it in `llamaops/builders/serve/__init__.py`; `spec.runtime`
picks one by name (the CRD's enum is generated from this registry).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llamaops.api import LlamaServe
from llamaops.api.catalog import CatalogModel
from llamaops.api.validation import AdapterFacts, RuntimeReport
from llamaops.settings import Settings
from llamaops.state.serve import ResolvedAdapter


class ServeError(ValueError):
    """The spec and its adapters cannot be served (reported on the LlamaServe, nothing is built)."""


@dataclass(frozen=True)
class ServeContext:
    """What a runtime builds its server from, resolved by the workload builder."""

    adapters: list[ResolvedAdapter]
    adapter_paths: Mapping[str, str]  # adapter name -> where the server finds it (a mount, or an hf repo id)
    model_path: str  # the base model as the server names it (a mount for pvc://, else the repo id)
    config_dir: str  # where the runtime's files (Server.files) are mounted


@dataclass
class Server:
    """A runtime's part of the pod: its container's command, environment and probes, and its files."""

    command: list[str]
    args: list[str] | None = None
    env: list[dict[str, Any]] = field(default_factory=list)
    # The action of the startup probe (what "loaded" means) and the httpGet of readiness and liveness.
    startup: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # its ConfigMap's data, mounted at ServeContext.config_dir
    annotations: dict[str, str] = field(default_factory=dict)  # on the pod template (metrics scraping)
    volumes: list[dict[str, Any]] = field(default_factory=list)  # extra volumes and their mounts (/dev/shm)
    mounts: list[dict[str, Any]] = field(default_factory=list)


@runtime_checkable
class ServingRuntime(Protocol):
    name: str  # spec.runtime
    section: str | None  # its spec section (vllm, ollama), if it has one
    config_suffix: str  # its ConfigMap is <serve>-<config_suffix>
    config_dir: str  # where that ConfigMap is mounted
    cache_dir: str  # where the model-cache volume is mounted

    def image(self, settings: Settings) -> str:
        """The default image (spec.image overrides it)."""
        ...

    def port(self, lsv: LlamaServe) -> int:
        """The port of its OpenAI-compatible server."""
        ...

    def gpus(self, lsv: LlamaServe) -> int:
        """nvidia.com/gpu per replica."""
        ...

    def section_set(self, lsv: LlamaServe) -> bool:
        """Whether the spec sets anything in this runtime's section (refused when another runtime serves)."""
        ...

    def validate(self, lsv: LlamaServe, model: CatalogModel | None,
                 adapters: Mapping[str, AdapterFacts]) -> RuntimeReport:
        """Problems of the spec for this runtime (and its memory plan, if it makes one). `model`: the catalog
        entry of the base model, if it has one; `adapters`: what is known of each adapter by name (rank,
        modules)."""
        ...

    def server(self, lsv: LlamaServe, ctx: ServeContext) -> Server:
        """Its server for these adapters. Raises ServeError when they cannot be served together."""
        ...


_REGISTRY: dict[str, ServingRuntime] = {}


def register(runtime: ServingRuntime) -> None:
    """Make a runtime selectable by spec.runtime."""
    _REGISTRY[runtime.name] = runtime


def names() -> list[str]:
    return sorted(_REGISTRY)


def runtimes() -> list[ServingRuntime]:
    return [_REGISTRY[n] for n in names()]


def get(name: str) -> ServingRuntime:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ServeError(f"unsupported runtime {name!r}: use one of {', '.join(names())}") from None
