"""Semantic validation: what a CRD schema cannot express.

Pure functions over plain dicts (a manifest as read from a file or the API
server). Every problem is reported at once, each naming its field by the path
the user wrote (`spec.training.max_seq_length`). The CLI's `validate`, the
operator's admission and the trainer all call these.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import celpy
from pydantic import BaseModel, ValidationError

from llamaops.api import catalog
from llamaops.api.contract import redact_url
from llamaops.api.finetune import LLAMA_PROJECTIONS, LlamaFineTune
from llamaops.api.memory import TrainingPlan, plan_training
from llamaops.api.schema import openapi_schema
from llamaops.api.serve import LlamaServe

Severity = Literal["error", "warning"]
_LLAMA_MODULES = {*LLAMA_PROJECTIONS, "all-linear", "lm_head", "embed_tokens"}


@dataclass(frozen=True)
class Problem:
    field: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass
class Result:
    """The outcome of validating one manifest."""

    kind: str
    name: str
    obj: BaseModel | None
    problems: list[Problem]
    plan: Any = None  # TrainingPlan / ServingPlan when a catalog model was planned

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


def _wire_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the key at `loc` (for did-you-mean suggestions)."""
    current: Any = root
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        fields = {f.alias or n: f for n, f in current.model_fields.items()}
        field = fields.get(part)
        if field is None:
            return None
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """BaseModel inside Optional[...] / list[...]."""
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap(arg)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return annotation


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


def parse_problems(exc: ValidationError, root: type[BaseModel]) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = err["loc"]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        if err["type"] == "extra_forbidden":
            owner = _model_at(root, loc)
            allowed = _wire_keys(owner) if owner else []
            hint = _suggest(str(loc[-1]), allowed)
            msg = f"unknown field{hint}" if hint else f"unknown field; allowed: {', '.join(allowed)}"
        elif err["type"] == "literal_error":
            msg = f"unsupported value {err['input']!r}: {err['msg'].removeprefix('Input should be ')}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            given = redact_url(err["input"]) if isinstance(err["input"], str) else err["input"]
            msg = f"{err['msg']} (got {given!r})" if not isinstance(err["input"], dict) else err["msg"]
        problems.append(Problem(path or "(object)", msg))
    return problems


@cache
def _cel_program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_walk(schema: dict[str, Any], value: Any, path: str) -> Iterator[Problem]:
    """Evaluate the schema's x-kubernetes-validations rules, as the API server does on create.

    Transition rules (those reading oldSelf) need the stored object and are left to the server.
    """
    for entry in schema.get("x-kubernetes-validations", ()):
        if "oldSelf" in entry["rule"]:
            continue
        if not _cel_program(entry["rule"]).evaluate({"self": celpy.json_to_cel(value)}):
            yield Problem(path + entry.get("fieldPath", ""), entry["message"])
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                yield from _cel_walk(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _cel_walk(schema["items"], item, f"{path}[{i}]")


def cel_problems(obj: LlamaFineTune | LlamaServe) -> list[Problem]:
    """The CRD's CEL rules on the spec with every default filled in, as the server stores it."""
    spec = obj.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    return list(_cel_walk(openapi_schema(type(obj.spec)), spec, "spec"))


def _check_catalog_modules(targets: list[str], field: str) -> list[Problem]:
    problems = []
    for i, module in enumerate(targets):
        if module not in _LLAMA_MODULES:
            hint = _suggest(module, sorted(_LLAMA_MODULES))
            problems.append(Problem(f"{field}[{i}]", f'"{module}" is not a module of Llama models{hint}'))
    return problems


def _gb(x: float) -> str:
    return f"{x:.1f} GB"


def _plan_problem(plan: TrainingPlan, name: str, quantized: bool) -> Problem | None:
    if plan.fits:
        return None
    need = f"{plan.per_gpu_gb:.0f} GB per GPU, above the {_gb(plan.budget_gb)} usable of a {plan.gpu_memory_gb:.0f} GB GPU"
    if plan.min_gpus is None:
        return Problem("spec.training.per_device_train_batch_size",
                       f"{name} needs {need} even fully sharded (activations and logits alone do not fit): "
                       "lower per_device_train_batch_size or max_seq_length, or enable gradient_checkpointing")
    alternatives = "larger GPUs" if quantized else "4-bit quantization (QLoRA) or larger GPUs"
    return Problem("spec.resources.gpusPerNode",
                   f"{name} needs {need} with {plan.gpus} GPU(s); it needs at least {plan.min_gpus} GPUs "
                   f"of {plan.gpu_memory_gb:.0f} GB (sharded), or {alternatives}")


def validate_finetune(manifest: Mapping[str, Any]) -> Result:
    name = (manifest.get("metadata") or {}).get("name", "")
    try:
        lft = LlamaFineTune.model_validate(dict(manifest))
    except ValidationError as exc:
        return Result("LlamaFineTune", name, None, parse_problems(exc, LlamaFineTune))
    spec = lft.spec
    problems = cel_problems(lft)
    plan = None
    model = catalog.lookup(spec.model.base_model)
    if model is None:
        sizes = catalog.nearest_sizes(spec.model.base_model)
        hint = f" (that family has {', '.join(sizes)})" if sizes else ""
        problems.append(Problem("spec.model.base_model",
                                f'"{spec.model.base_model}" is not in the Llama catalog{hint}: context length and '
                                "GPU memory are not checked", "warning"))
    else:
        if spec.training.max_seq_length > model.context:
            problems.append(Problem("spec.training.max_seq_length",
                                    f"{spec.training.max_seq_length} exceeds the {model.context}-token context of "
                                    f"{model.name}"))
        problems += _check_catalog_modules(spec.lora.target_modules, "spec.lora.target_modules")
        if model.multimodal:
            problems.append(Problem("spec.model.base_model", f"{model.name} is a vision model: only its text "
                                    "layers are fine-tuned", "warning"))
        if spec.resources.gpus_per_node > 0:
            plan = plan_training(spec, model.arch)
            quantized = spec.quantization.enabled
            problem = _plan_problem(plan, model.name + (" QLoRA" if quantized else " LoRA"), quantized)
            if problem:
                problems.append(problem)
            if plan.gpu_memory_assumed and spec.resources.gpu_product:
                problems.append(Problem("spec.resources.gpuProduct",
                                        f'unknown GPU "{spec.resources.gpu_product}": the memory plan assumes '
                                        f"{plan.gpu_memory_gb:.0f} GB; set resources.gpuMemoryGB", "warning"))
    t, q = spec.training, spec.quantization
    if t.eval_strategy != "no" and spec.dataset.eval_fraction == 0:
        problems.append(Problem("spec.dataset.evalFraction",
                                f"must be > 0 when training.eval_strategy is {t.eval_strategy!r}"))
    if t.fp16 and q.load_in_4bit and q.bnb_4bit_compute_dtype == "bfloat16":
        problems.append(Problem("spec.quantization.bnb_4bit_compute_dtype",
                                "bfloat16 compute with fp16 training mixes precisions; use float16", "warning"))
    if t.max_steps > 0 and t.warmup_steps >= t.max_steps:
        problems.append(Problem("spec.training.warmup_steps",
                                f"{t.warmup_steps} warm-up steps leave none of the {t.max_steps} max_steps"))
    if spec.resources.nodes > 1 and spec.output.pvc is not None:
        problems.append(Problem("spec.output.pvc", "several nodes write checkpoints: the claim must be "
                                "ReadWriteMany (only rank 0 writes the adapter)", "warning"))
    return Result("LlamaFineTune", name, lft, problems, plan)


@dataclass
class RuntimeReport:
    """What a serving runtime's own checks found, and its plan of GPU memory (None when it makes none)."""

    problems: list[Problem]
    plan: Any = None


# A serving runtime's own checks (llamaops.builders.serve: the registered runtime of spec.runtime), given the
# catalog entry of the base model (None when it has none) and each adapter's LoRA rank where known.
@dataclass(frozen=True)
class AdapterFacts:
    """What is known of an adapter a LlamaServe lists: from its run's spec (or report), or the spec's `r`."""

    r: int | None = None
    target_modules: tuple[str, ...] = ()  # empty when unknown (an adapter given by uri)
    modules_to_save: tuple[str, ...] = ()
    source: str = ""  # where the modules come from, for messages: 'LlamaFineTune "x"'


RuntimeChecks = Callable[[LlamaServe, "catalog.CatalogModel | None", Mapping[str, AdapterFacts]], RuntimeReport]


def validate_serve(manifest: Mapping[str, Any], finetunes: Mapping[str, LlamaFineTune] | None = None, *,
                   warn_missing: bool = True, runtime_checks: RuntimeChecks) -> Result:
    """What every runtime shares (schema, CEL, the adapters' base models, replicas and budgets), then the
    runtime's own checks. Call it through llamaops.builders.serve.validate_serve, which knows the runtimes.

    `finetunes`, when given, are the LlamaFineTunes of the namespace by name. A fineTuneRef not among them is
    a warning, unless `warn_missing` is False (the operator reports such an adapter as awaited instead).
    """
    name = (manifest.get("metadata") or {}).get("name", "")
    try:
        lsv = LlamaServe.model_validate(dict(manifest))
    except ValidationError as exc:
        return Result("LlamaServe", name, None, parse_problems(exc, LlamaServe))
    spec = lsv.spec
    problems = cel_problems(lsv)
    model = catalog.lookup(spec.model.base_model)
    if model is None:
        problems.append(Problem("spec.model.base_model", f'"{spec.model.base_model}" is not in the Llama catalog: '
                                "context length and GPU memory are not checked", "warning"))
    facts: dict[str, AdapterFacts] = {}
    for i, adapter in enumerate(spec.adapters):
        path = f"spec.adapters[{i}]"
        facts[adapter.name] = AdapterFacts(adapter.r)
        if adapter.fine_tune_ref and finetunes is not None:
            ref = finetunes.get(adapter.fine_tune_ref)
            if ref is None:
                if warn_missing:
                    problems.append(Problem(f"{path}.fineTuneRef",
                                            f'LlamaFineTune "{adapter.fine_tune_ref}" does not exist', "warning"))
            else:
                # What the run reports once it finished (the trainer's real rank), else what it will export.
                done = ref.status.adapter if ref.status is not None and ref.status.adapter is not None else None
                lora = ref.spec.lora
                facts[adapter.name] = AdapterFacts(done.r if done is not None else lora.exported_rank,
                                                   tuple(lora.target_modules), tuple(lora.modules_to_save or ()),
                                                   f'LlamaFineTune "{adapter.fine_tune_ref}"')
                base = done.base_model if done is not None else ref.spec.model.base_model
                if base != spec.model.base_model:
                    problems.append(Problem(f"{path}.fineTuneRef",
                                            f'adapter "{adapter.name}" was trained on "{base}", not on the served '
                                            f'"{spec.model.base_model}"'))
        if adapter.base_model is not None and adapter.base_model != spec.model.base_model:
            problems.append(Problem(f"{path}.baseModel",
                                    f'adapter "{adapter.name}" was trained on "{adapter.base_model}", not on the '
                                    f'served "{spec.model.base_model}"'))
    if spec.autoscaling is not None and spec.replicas != 1:
        problems.append(Problem("spec.replicas", "autoscaling is set: the HorizontalPodAutoscaler owns the replica "
                                "count and spec.replicas is ignored", "warning"))
    if spec.pod_disruption_budget is not None and spec.pod_disruption_budget.min_available is not None \
            and spec.autoscaling is None and spec.pod_disruption_budget.min_available >= spec.replicas > 0:
        problems.append(Problem("spec.podDisruptionBudget.minAvailable",
                                f"{spec.pod_disruption_budget.min_available} of {spec.replicas} replicas leaves no "
                                "room for a voluntary disruption: node drains will block", "warning"))
    report = runtime_checks(lsv, model, facts)
    return Result("LlamaServe", name, lsv, problems + report.problems, report.plan)


def validate_manifest(manifest: Mapping[str, Any], *, runtime_checks: RuntimeChecks) -> Result:
    kind = manifest.get("kind")
    if kind == "LlamaFineTune":
        return validate_finetune(manifest)
    if kind == "LlamaServe":
        return validate_serve(manifest, runtime_checks=runtime_checks)
    name = (manifest.get("metadata") or {}).get("name", "")
    return Result(str(kind), name, None,
                  [Problem("kind", f"unsupported kind {kind!r}: expected LlamaFineTune or LlamaServe")])
