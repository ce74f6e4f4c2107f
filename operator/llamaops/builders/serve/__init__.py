"""The serving workload of a LlamaServe: one builder for every runtime, each runtime behind one seam.

    runtime.py     the ServingRuntime protocol and its registry
    workload.py    the Deployment, Service, PDB, HPA and the runtime's ConfigMap, for any runtime
    validation.py  LlamaServe validation with the runtime's own checks
    vllm.py        vLLM (`vllm serve`, the default)
    ollama.py      Ollama (Modelfiles)

Each runtime module registers itself when imported here; a new runtime is one
module and one name on the import line below.
"""

from llamaops.builders.serve import ollama, vllm  # noqa: F401  (registers the runtimes)
from llamaops.builders.serve.runtime import ServeContext, ServeError, Server, ServingRuntime, register
from llamaops.builders.serve.validation import runtime_checks, validate_manifest, validate_serve
from llamaops.builders.serve.workload import (
    COMPONENT,
    ServeWorkload,
    config_map_names,
    deployment,
    endpoint,
    names,
    runtime_of,
    workload,
)
from llamaops.state.serve import ResolvedAdapter, S3Credentials

__all__ = ["COMPONENT", "ResolvedAdapter", "S3Credentials", "ServeContext", "ServeError", "ServeWorkload", "Server",
           "ServingRuntime", "config_map_names", "deployment", "endpoint", "names", "register", "runtime_checks",
           "runtime_of", "validate_manifest", "validate_serve", "workload"]
