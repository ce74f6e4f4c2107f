"""vLLM ("vllm", the default runtime): `vllm serve` with the seed's flags, LoRA adapters and the training prompt.

Its section is `spec.vllm` (the seed's `vllm serve` flags, dashes as
underscores). The chat template that serves the adapters' system prompt is its
file (ConfigMap <name>-chat-template); the API key reaches it as VLLM_API_KEY,
never on the command line; tensor parallelism gets the GPUs and an in-memory
/dev/shm.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from llamaops.api import LlamaServe
from llamaops.api.catalog import CatalogModel
from llamaops.api.chat_template import served_template
from llamaops.api.contract import HF_HOME
from llamaops.api.memory import plan_serving
from llamaops.api.serve import VLLM_LORA_RANKS, VllmSpec
from llamaops.api.validation import AdapterFacts, Problem, RuntimeReport
from llamaops.builders.scheduling import secret_env
from llamaops.builders.serve.runtime import ServeContext, ServeError, Server, register
from llamaops.builders.serve.workload import system_prompt
from llamaops.settings import Settings
from llamaops.state.serve import ResolvedAdapter

CHAT_TEMPLATE_DIR = "/etc/llamaops/chat"
CHAT_TEMPLATE_FILE = "template.jinja"
# --max-lora-rank when no adapter's rank is known (vLLM's own default).
DEFAULT_MAX_LORA_RANK = 16

LM_HEAD_MODULES = ("lm_head",)  # LoRA targets vLLM refuses (vllm#9280)


def round_lora_rank(r: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that covers rank `r`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ServeError(f"LoRA rank {r} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")


def served_model_name(lsv: LlamaServe) -> str:
    return lsv.spec.vllm.served_model_name or lsv.spec.model.base_model


def chat_template(lsv: LlamaServe, adapters: list[ResolvedAdapter]) -> str | None:
    """The template vLLM is given (`--chat-template`), or None to keep the tokenizer's own."""
    if lsv.spec.vllm.chat_template:
        return lsv.spec.vllm.chat_template
    prompt = system_prompt(lsv, adapters)
    return served_template(lsv.spec.model.base_model, prompt) if prompt else None


def vllm_args(lsv: LlamaServe, ctx: ServeContext, template: str | None) -> list[str]:
    """Everything after `vllm serve`: the model, then flags. The API key is never here (env VLLM_API_KEY)."""
    v, adapters = lsv.spec.vllm, ctx.adapters
    args = [ctx.model_path, "--host", "0.0.0.0", "--port", str(v.port),
            "--tensor-parallel-size", str(v.tensor_parallel_size)]
    if v.max_model_len:
        args += ["--max-model-len", str(v.max_model_len)]
    args += ["--gpu-memory-utilization", str(v.gpu_memory_utilization), "--dtype", v.dtype]
    if v.max_num_seqs:
        args += ["--max-num-seqs", str(v.max_num_seqs)]
    if v.quantization:
        args += ["--quantization", v.quantization]
    # The name clients use for the base model; adapters' base_model_name points at it.
    args += ["--served-model-name", served_model_name(lsv)]
    if lsv.spec.model.revision:
        args += ["--revision", lsv.spec.model.revision]
    if lsv.spec.model.trust_remote_code:
        args.append("--trust-remote-code")
    if v.enable_prefix_caching is not None:
        args.append("--enable-prefix-caching" if v.enable_prefix_caching else "--no-enable-prefix-caching")
    if adapters:
        ranks = [a.r for a in adapters if a.r is not None]
        max_rank = v.max_lora_rank or round_lora_rank(max(ranks, default=DEFAULT_MAX_LORA_RANK))
        max_loras = v.max_loras or len(adapters)
        args.append("--enable-lora")
        args.append("--lora-modules")
        args += [json.dumps({"name": a.name, "path": ctx.adapter_paths[a.name],
                             "base_model_name": served_model_name(lsv)}, separators=(",", ":")) for a in adapters]
        args += ["--max-loras", str(max_loras), "--max-lora-rank", str(max_rank)]
        if v.max_cpu_loras:
            args += ["--max-cpu-loras", str(max(v.max_cpu_loras, max_loras))]
    if template is not None:
        args += ["--chat-template", f"{ctx.config_dir}/{CHAT_TEMPLATE_FILE}"]
    args += list(v.extra_args or [])
    return args


class VllmRuntime:
    name = "vllm"
    section = "vllm"
    config_suffix = "chat-template"
    config_dir = CHAT_TEMPLATE_DIR
    cache_dir = HF_HOME

    def image(self, settings: Settings) -> str:
        return settings.vllm_image

    def port(self, lsv: LlamaServe) -> int:
        return lsv.spec.vllm.port

    def gpus(self, lsv: LlamaServe) -> int:
        return lsv.spec.vllm.tensor_parallel_size

    def section_set(self, lsv: LlamaServe) -> bool:
        return lsv.spec.vllm != VllmSpec()

    def validate(self, lsv: LlamaServe, model: CatalogModel | None,
                 adapters: Mapping[str, AdapterFacts]) -> RuntimeReport:
        spec, v = lsv.spec, lsv.spec.vllm
        problems: list[Problem] = []
        plan = None
        if model is not None:
            if v.max_model_len and v.max_model_len > model.context:
                problems.append(Problem("spec.vllm.max_model_len",
                                        f"{v.max_model_len} exceeds the {model.context}-token context of {model.name}"))
            heads = model.arch.heads
            if heads % v.tensor_parallel_size:
                divisors = [str(d) for d in range(1, heads + 1) if heads % d == 0 and d <= 64]
                problems.append(Problem("spec.vllm.tensor_parallel_size",
                                        f"{v.tensor_parallel_size} does not divide the {heads} attention heads of "
                                        f"{model.name}; use one of {', '.join(divisors)}"))
            else:
                plan = plan_serving(spec, model.arch, model.context)
                if not plan.fits:
                    hint = (f"use tensor_parallel_size >= {plan.min_tensor_parallel_size}"
                            if plan.min_tensor_parallel_size else "lower max_model_len or quantize")
                    problems.append(Problem("spec.vllm.tensor_parallel_size",
                                            f"{model.name} needs {plan.per_gpu_gb:.0f} GB per GPU with "
                                            f"tensor_parallel_size {v.tensor_parallel_size}, above the "
                                            f"{plan.budget_gb:.1f} GB vLLM may use: {hint}"))
        if v.max_loras is not None and spec.adapters and v.max_loras < len(spec.adapters):
            problems.append(Problem("spec.vllm.max_loras",
                                    f"{v.max_loras} is below the {len(spec.adapters)} adapters listed"))
        for i, adapter in enumerate(spec.adapters):
            facts = adapters.get(adapter.name, AdapterFacts())
            r = facts.r
            # vLLM loads LoRA weights for linear layers only: it refuses an adapter that saves whole modules
            # or adapts lm_head (vllm#9280), so a pod would crash-loop on it.
            unserved = [*facts.modules_to_save, *(m for m in facts.target_modules if m in LM_HEAD_MODULES)]
            if unserved:
                problems.append(Problem(f"spec.adapters[{i}]",
                                        f'adapter "{adapter.name}" ({facts.source}) trains {", ".join(unserved)} '
                                        "(lora.modules_to_save or an lm_head target): vLLM refuses such "
                                        "adapters; train LoRA on the linear layers only"))
            if r is not None and v.max_lora_rank is not None and r > v.max_lora_rank:
                problems.append(Problem("spec.vllm.max_lora_rank",
                                        f'{v.max_lora_rank} is below the rank {r} of adapter "{adapter.name}"; '
                                        f"use one of {', '.join(str(x) for x in VLLM_LORA_RANKS if x >= r)}"))
        if v.chat_template and spec.system_prompt:
            problems.append(Problem("spec.systemPrompt", "vllm.chat_template is set and takes precedence", "warning"))
        return RuntimeReport(problems, plan)

    def server(self, lsv: LlamaServe, ctx: ServeContext) -> Server:
        v, spec = lsv.spec.vllm, lsv.spec
        template = chat_template(lsv, ctx.adapters)
        health = {"path": "/health", "port": "http"}
        server = Server(
            # The image's entrypoint differs between releases; name the command outright.
            command=["vllm", "serve"], args=vllm_args(lsv, ctx, template),
            startup={"httpGet": dict(health)}, health=health,
            files={CHAT_TEMPLATE_FILE: template} if template is not None else {},
            annotations={"prometheus.io/scrape": "true", "prometheus.io/port": str(v.port),
                         "prometheus.io/path": "/metrics"})
        if spec.api_key_secret_ref is not None:
            server.env.append(secret_env("VLLM_API_KEY", spec.api_key_secret_ref.name, spec.api_key_secret_ref.key))
        if v.tensor_parallel_size > 1:
            server.env.append({"name": "NCCL_DEBUG", "value": "WARN"})
            # NCCL's shared-memory transport between the tensor-parallel workers fails on the default 64Mi.
            server.volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory",
                                                                "sizeLimit": spec.resources.shm_size}})
            server.mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        return server


register(VllmRuntime())
