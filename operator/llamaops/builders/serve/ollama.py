"""Ollama ("ollama", the seed's second deployment path): one model per adapter, created from Modelfiles.

Its section is `spec.ollama`. Its files are the Modelfiles (ConfigMap
<name>-modelfiles): the base itself (`FROM` base, `SYSTEM`), then one model
per adapter (`FROM` base, `ADAPTER`, `SYSTEM`), created with `ollama create`
before the replica counts as started. Ollama serves the OpenAI API under /v1
on port 11434.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from llamaops.api import LlamaServe
from llamaops.api.catalog import CatalogModel
from llamaops.api.serve import OllamaSpec
from llamaops.api.validation import Problem, RuntimeReport
from llamaops.builders.serve.runtime import ServeContext, ServeError, Server, register
from llamaops.builders.serve.workload import system_prompt
from llamaops.settings import Settings

OLLAMA_PORT = 11434
OLLAMA_HOME = "/root/.ollama"
OLLAMA_READY = "/tmp/llamaops-models-created"
MODELFILE_DIR = "/etc/llamaops/modelfiles"


def settings_of(lsv: LlamaServe) -> OllamaSpec:
    return lsv.spec.ollama or OllamaSpec()


def model_name(lsv: LlamaServe) -> str:
    return settings_of(lsv).served_model_name or (lsv.metadata.name or "base")


def modelfile_problem(text: str, what: str) -> str | None:
    """Why `text` cannot be written into a Modelfile line: SYSTEM takes a triple-quoted block (with no escape for
    three quotes inside), FROM and ADAPTER one line."""
    if what == "system prompt":
        return 'it contains """, which ends an Ollama SYSTEM block' if '"""' in text else None
    return "it contains whitespace or a line break, which would add lines to the Modelfile" \
        if any(ch.isspace() for ch in text) else None


def modelfiles(lsv: LlamaServe, ctx: ServeContext) -> list[tuple[str, str]]:
    """(model name, Modelfile): the base itself, then one model per adapter (FROM base, ADAPTER, SYSTEM).
    Raises ServeError rather than render what would change the Modelfile's meaning (a prompt from a run)."""
    base = ctx.model_path
    prompt = system_prompt(lsv, ctx.adapters)
    for text, what in ((base, "base model"), (prompt or "", "system prompt"),
                       *((p, "adapter path") for p in ctx.adapter_paths.values())):
        why = modelfile_problem(text, what)
        if why:
            raise ServeError(f"the {what} cannot be served by Ollama: {why}")
    system = f'SYSTEM """{prompt}"""\n' if prompt else ""
    files = [(model_name(lsv), f"FROM {base}\n{system}")]
    files += [(a.name, f"FROM {base}\nADAPTER {ctx.adapter_paths[a.name]}\n{system}") for a in ctx.adapters]
    return files


def ollama_script(models: list[str], config_dir: str = MODELFILE_DIR) -> str:
    """Start the server, create every model from its Modelfile, mark the replica started, stay with the server.

    `models` are the names of `modelfiles`, in order (ConfigMap key model-<i>). The startup probe waits
    for the marker, so the Service sends no traffic before every model exists.
    """
    steps = ["set -e", f"rm -f {OLLAMA_READY}", "ollama serve &", "pid=$!",
             "until ollama list >/dev/null 2>&1; do sleep 1; done"]
    for i, model in enumerate(models):
        steps.append(f"ollama create {shlex.quote(model)} -f {config_dir}/model-{i}")
    steps += [f"touch {OLLAMA_READY}", "wait $pid"]
    return "\n".join(steps)


class OllamaRuntime:
    name = "ollama"
    section = "ollama"
    config_suffix = "modelfiles"
    config_dir = MODELFILE_DIR
    cache_dir = OLLAMA_HOME  # its model store

    def image(self, settings: Settings) -> str:
        return settings.ollama_image

    def port(self, lsv: LlamaServe) -> int:
        return OLLAMA_PORT

    def gpus(self, lsv: LlamaServe) -> int:
        return settings_of(lsv).gpus

    def section_set(self, lsv: LlamaServe) -> bool:
        return lsv.spec.ollama is not None

    def validate(self, lsv: LlamaServe, model: CatalogModel | None,
                 ranks: Mapping[str, int | None]) -> RuntimeReport:
        problems = []
        spec = lsv.spec
        if spec.api_key_secret_ref is not None:
            problems.append(Problem("spec.apiKeySecretRef", "Ollama has no API keys: requests would be served "
                                    "without one; use runtime: vllm, or put an authenticating proxy in front"))
        for field, text, what in (("spec.model.base_model", spec.model.base_model, "base model"),
                                  ("spec.systemPrompt", spec.system_prompt or "", "system prompt")):
            why = modelfile_problem(text, what)
            if why:
                problems.append(Problem(field, f"cannot be written into an Ollama Modelfile: {why}"))
        for i, adapter in enumerate(lsv.spec.adapters):
            if adapter.uri and adapter.uri.startswith("hf://"):
                problems.append(Problem(f"spec.adapters[{i}].uri", "Ollama reads adapters from local files: use a "
                                                                    "pvc:// or s3:// adapter (or runtime: vllm)"))
        context = settings_of(lsv).context_length
        if model is not None and context and context > model.context:
            problems.append(Problem("spec.ollama.context_length",
                                    f"{context} exceeds the {model.context}-token context of {model.name}"))
        return RuntimeReport(problems)

    def server(self, lsv: LlamaServe, ctx: ServeContext) -> Server:
        files = modelfiles(lsv, ctx)
        server = Server(
            command=["/bin/sh", "-c", ollama_script([m for m, _ in files], ctx.config_dir)],
            env=[{"name": "OLLAMA_HOST", "value": f"0.0.0.0:{OLLAMA_PORT}"}],
            # Started once every model was created from its Modelfile (ollama_script).
            startup={"exec": {"command": ["test", "-f", OLLAMA_READY]}},
            health={"path": "/", "port": "http"},  # "Ollama is running"
            files={f"model-{i}": doc for i, (_, doc) in enumerate(files)})
        context = settings_of(lsv).context_length
        if context:
            server.env.append({"name": "OLLAMA_CONTEXT_LENGTH", "value": str(context)})
        return server


register(OllamaRuntime())
