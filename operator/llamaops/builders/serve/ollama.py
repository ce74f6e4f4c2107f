"""Ollama ("ollama", the seed's second deployment path): one model per adapter, created from Modelfiles.

Its section is `spec.ollama`. Its files are the Modelfiles (ConfigMap
<name>-modelfiles): the base itself (`FROM` base, `TEMPLATE`, `SYSTEM`), then one
model per adapter (`FROM` base, `ADAPTER`, `TEMPLATE`, `SYSTEM`), created with
`ollama create` before the replica counts as started. TEMPLATE is the chat
template the adapter was trained with, written for Ollama, so the served prompt is
the trained one. Ollama serves the OpenAI API under /v1 on port 11434.

Each adapter is also created as `<name>:<version>`, the version a digest of its
location and revision (a re-trained run's adapter gets a new one): clients keep
asking for `<name>` (Ollama's `<name>:latest`), and the versioned name says which
weights answer, as a name that changes with the weights (vllm#42125: reloading
other weights under one name can serve stale cache).

Paths in a Modelfile are relative to the Modelfile's directory (Ollama resolves
them there), so the same ConfigMap works wherever the pod's volumes are mounted.
Each adapter is staged into the pod's work directory before `ollama create`: Ollama
0.17 looks for `model*.safetensors` in an ADAPTER directory and misses PEFT's
`adapter_model.safetensors` (ollama#13314).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from llamaops.api import LlamaServe
from llamaops.api.catalog import CatalogModel
from llamaops.api.chat_template import OLLAMA_STOP_TOKENS, ollama_template
from llamaops.api.contract import digest
from llamaops.api.serve import OllamaSpec
from llamaops.api.validation import AdapterFacts, Problem, RuntimeReport
from llamaops.builders.serve.runtime import ServeContext, ServeError, Server, register
from llamaops.builders.serve.workload import system_prompt
from llamaops.settings import Settings
from llamaops.state.serve import ResolvedAdapter

OLLAMA_PORT = 11434
OLLAMA_HOME = "/root/.ollama"
OLLAMA_WORK = "/var/lib/llamaops/ollama"  # emptyDir: staged adapters, the "models created" marker
OLLAMA_READY = f"{OLLAMA_WORK}/started"
MODELFILE_DIR = "/etc/llamaops/modelfiles"
# Ollama 0.17's llama adapter conversion permutes lora_A of q_proj/k_proj for the rotary layout, where the
# permutation belongs on lora_B (the output rows): such an adapter is served as a different model.
MISCONVERTED_MODULES = ("q_proj", "k_proj")


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


def staged(adapter: str) -> str:
    """Where the pod stages an adapter for `ollama create` (see the module docstring)."""
    return f"{OLLAMA_WORK}/adapters/{adapter}"


def modelfile_path(path: str, config_dir: str) -> str:
    """An absolute container path as a Modelfile line gives it: relative to the Modelfile's directory.
    Anything else (a registry model such as llama3.1:8b) stays as it is."""
    return posixpath.relpath(path, config_dir) if path.startswith("/") else path


def modelfiles(lsv: LlamaServe, ctx: ServeContext) -> list[tuple[str, str]]:
    """(model name, Modelfile): the base itself, then one model per adapter (FROM base, ADAPTER, TEMPLATE,
    SYSTEM). Raises ServeError rather than render what would change the Modelfile's meaning (a prompt from a
    run)."""
    base = ctx.model_path
    prompt = system_prompt(lsv, ctx.adapters)
    for text, what in ((base, "base model"), (prompt or "", "system prompt"),
                       *((p, "adapter path") for p in ctx.adapter_paths.values())):
        why = modelfile_problem(text, what)
        if why:
            raise ServeError(f"the {what} cannot be served by Ollama: {why}")
    tail = f'TEMPLATE """{ollama_template(lsv.spec.model.base_model)}"""\n'
    tail += f'SYSTEM """{prompt}"""\n' if prompt else ""
    tail += "".join(f"PARAMETER stop {token}\n" for token in OLLAMA_STOP_TOKENS)
    source = f"FROM {modelfile_path(base, ctx.config_dir)}\n"
    files = [(model_name(lsv), source + tail)]
    for a in ctx.adapters:
        doc = f"{source}ADAPTER {modelfile_path(staged(a.name), ctx.config_dir)}\n{tail}"
        files += [(a.name, doc), (f"{a.name}:{adapter_version(a)}", doc)]
    return files


def adapter_version(adapter: ResolvedAdapter) -> str:
    """A tag that changes with the adapter's weights: its location and the revision of its run."""
    return digest({"uri": adapter.uri, "revision": adapter.revision})[:12]


# Positional parameters: the Modelfile directory, the work directory, NAME SOURCE pairs (adapters to
# stage), --, the model names in Modelfile order (ConfigMap key model-<i>). Paths travel as arguments, not
# inside the script, so they stay plain arguments of the container.
OLLAMA_SCRIPT = """set -e
config=$1 work=$2
shift 2
rm -f "$work/started"
while [ "$1" != -- ]; do
  mkdir -p "$work/adapters/$1"
  cp "$2/adapter_config.json" "$work/adapters/$1/adapter_config.json"
  cp "$2/adapter_model.safetensors" "$work/adapters/$1/model.safetensors"
  shift 2
done
shift
ollama serve &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
until ollama list >/dev/null 2>&1; do kill -0 "$pid"; sleep 1; done
i=0
for model in "$@"; do
  ollama create "$model" -f "$config/model-$i"
  i=$((i + 1))
done
touch "$work/started"
set +e
wait "$pid"
code=$?
if kill -0 "$pid" 2>/dev/null; then wait "$pid"; code=$?; fi
exit "$code"
"""


def ollama_command(models: list[str], ctx: ServeContext) -> list[str]:
    """Stage the adapters, start the server, create every model from its Modelfile, mark the replica
    started, stay with the server (passing it SIGTERM: a shell as PID 1 would not)."""
    pairs = [x for a in ctx.adapters for x in (a.name, ctx.adapter_paths[a.name])]
    return ["/bin/sh", "-c", OLLAMA_SCRIPT, "ollama-start", ctx.config_dir, OLLAMA_WORK, *pairs, "--", *models]


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
                 adapters: Mapping[str, AdapterFacts]) -> RuntimeReport:
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
            facts = adapters.get(adapter.name, AdapterFacts())
            wrong = [m for m in facts.target_modules if m in MISCONVERTED_MODULES]
            if wrong or facts.modules_to_save:
                why = (f"has LoRA weights on {', '.join(wrong)}, which Ollama 0.17 converts wrongly (it permutes "
                       "lora_A where the rotary layout needs lora_B permuted), so it would serve a different "
                       "model than the one trained; train without q_proj/k_proj for runtime: ollama"
                       if wrong else f"saves whole modules ({', '.join(facts.modules_to_save)}), which Ollama "
                                     "does not import")
                problems.append(Problem(f"spec.adapters[{i}]", f'adapter "{adapter.name}" ({facts.source}) {why}, '
                                                              "or serve it with runtime: vllm"))
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
            command=ollama_command([m for m, _ in files], ctx),
            env=[{"name": "OLLAMA_HOST", "value": f"0.0.0.0:{OLLAMA_PORT}"},
                 {"name": "OLLAMA_MODELS", "value": f"{OLLAMA_HOME}/models"},
                 # A server keeps its models loaded (Ollama unloads idle ones after 5 minutes).
                 {"name": "OLLAMA_KEEP_ALIVE", "value": "-1"}],
            volumes=[{"name": "ollama-work", "emptyDir": {}}],
            mounts=[{"name": "ollama-work", "mountPath": OLLAMA_WORK}],
            # Started once every model was created from its Modelfile (OLLAMA_SCRIPT).
            startup={"exec": {"command": ["test", "-f", OLLAMA_READY]}},
            health={"path": "/", "port": "http"},  # "Ollama is running"
            files={f"model-{i}": doc for i, (_, doc) in enumerate(files)})
        context = settings_of(lsv).context_length
        if context:
            server.env.append({"name": "OLLAMA_CONTEXT_LENGTH", "value": str(context)})
        return server


register(OllamaRuntime())
