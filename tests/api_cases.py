"""Malformed LlamaFineTune and LlamaServe specs, each with the layer that must reject it.

Layers, earliest first:
  schema   - the CRD's OpenAPI schema (types, ranges, enums, patterns, unknown fields)
  cel      - the CRD's x-kubernetes-validations rules (cross-field constraints)
  semantic - llamaops.api.validation (catalog, context length, GPU memory, tensor parallelism)
The unit tests run every case offline; the cluster tests send the schema and
cel cases to the API server and check it rejects them naming the field, and
that it stores the semantic ones (the operator's validation catches those).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaops.api.manifests import load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DELETE = object()


def example(name: str) -> dict[str, Any]:
    return load_file(EXAMPLES / name)[0]


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    for key in keys[:-1]:
        doc = doc[int(key)] if isinstance(doc, list) else doc.setdefault(key, {})
    if value is DELETE:
        del doc[keys[-1]]
    elif isinstance(doc, list):
        doc[int(keys[-1])] = value
    else:
        doc[keys[-1]] = value


@dataclass(frozen=True)
class Case:
    id: str
    base: str  # example file
    edits: tuple[tuple[str, Any], ...]
    layer: str  # schema | cel | semantic
    field: str  # must appear in the message (offline: in the problem's field)
    words: str = ""  # and this, in the offline message

    def manifest(self) -> dict[str, Any]:
        doc = copy.deepcopy(example(self.base))
        doc["metadata"]["name"] = "bad-" + self.id.replace("_", "-")
        for path, value in self.edits:
            _set(doc, path, value)
        return doc


FT8 = "llama-3.1-8b-lora.yaml"
FT70 = "llama-3.3-70b-qlora.yaml"
SV8 = "llama-3.1-8b-serve.yaml"

CASES = [
    # --- schema: types, ranges, enums, patterns, unknown and missing fields
    Case("rank_wrong_type", FT8, (("spec.lora.r", "sixteen"),), "schema", "spec.lora.r"),
    Case("rank_zero", FT8, (("spec.lora.r", 0),), "schema", "spec.lora.r"),
    Case("alpha_zero", FT8, (("spec.lora.lora_alpha", 0),), "schema", "spec.lora.lora_alpha"),
    Case("dropout_above_one", FT8, (("spec.lora.lora_dropout", 1.5),), "schema", "spec.lora.lora_dropout"),
    Case("no_target_modules", FT8, (("spec.lora.target_modules", []),), "schema", "spec.lora.target_modules"),
    Case("quant_type_unknown", FT70, (("spec.quantization.bnb_4bit_quant_type", "nf5"),), "schema",
         "spec.quantization.bnb_4bit_quant_type", "nf4"),
    Case("compute_dtype_unknown", FT70, (("spec.quantization.bnb_4bit_compute_dtype", "bf16"),), "schema",
         "spec.quantization.bnb_4bit_compute_dtype", "bfloat16"),
    Case("learning_rate_negative", FT8, (("spec.training.learning_rate", -1e-5),), "schema",
         "spec.training.learning_rate"),
    Case("batch_size_zero", FT8, (("spec.training.per_device_train_batch_size", 0),), "schema",
         "spec.training.per_device_train_batch_size"),
    Case("scheduler_unknown", FT8, (("spec.training.lr_scheduler_type", "cosine_annealing"),), "schema",
         "spec.training.lr_scheduler_type", "cosine"),
    Case("optimizer_unknown", FT8, (("spec.training.optim", "adam"),), "schema", "spec.training.optim"),
    Case("training_key_typo", FT8, (("spec.training.learning_rate", DELETE), ("spec.training.learning_rat", 2e-5)),
         "schema", "spec.training.learning_rat", 'did you mean "learning_rate"'),
    Case("seq_length_string", FT8, (("spec.training.max_seq_length", "2048 tokens"),), "schema",
         "spec.training.max_seq_length"),
    Case("base_model_missing", FT8, (("spec.model.base_model", DELETE),), "schema", "spec.model.base_model",
         "required"),
    Case("trust_remote_code_string", FT8, (("spec.model.trust_remote_code", "yes"),), "schema",
         "spec.model.trust_remote_code"),
    Case("too_many_gpus_per_node", FT8, (("spec.resources.gpusPerNode", 17),), "schema",
         "spec.resources.gpusPerNode"),
    Case("zero_nodes", FT8, (("spec.resources.nodes", 0),), "schema", "spec.resources.nodes"),
    Case("memory_not_a_quantity", FT8, (("spec.resources.memory", "4 gigs"),), "schema", "spec.resources.memory"),
    Case("dataset_format_unknown", FT8, (("spec.dataset.format", "sharegpt"),), "schema", "spec.dataset.format",
         "messages"),
    Case("dataset_url_not_http", FT8, (("spec.dataset.pvc", DELETE), ("spec.dataset.http", {"url": "ftp://x/y.jsonl"})),
         "schema", "spec.dataset.http.url"),
    Case("output_claim_invalid", FT8, (("spec.output.pvc.claimName", "Bad_Claim"),), "schema",
         "spec.output.pvc.claimName"),
    Case("priority_string", FT8, (("spec.queue", {"priority": "high"}),), "schema", "spec.queue.priority"),
    Case("toleration_effect_unknown", FT8, (("spec.resources.tolerations", [{"key": "gpu", "effect": "NoRun"}]),),
         "schema", "spec.resources.tolerations[0].effect"),
    Case("hf_token_key_missing", FT8, (("spec.hfTokenSecretRef", {"name": "hf-token"}),), "schema",
         "spec.hfTokenSecretRef.key", "required"),
    Case("serve_rank_not_vllm", SV8, (("spec.vllm.max_lora_rank", 24),), "schema", "spec.vllm.max_lora_rank"),
    Case("serve_memory_fraction", SV8, (("spec.vllm.gpu_memory_utilization", 1.5),), "schema",
         "spec.vllm.gpu_memory_utilization"),
    Case("serve_adapter_name_invalid", SV8, (("spec.adapters.0.name", "My_Adapter"),), "schema",
         "spec.adapters[0].name"),
    Case("serve_adapter_names_duplicate", SV8,
         (("spec.adapters", [{"name": "a", "fineTuneRef": "run-x"}, {"name": "a", "fineTuneRef": "run-y"}]),),
         "schema", "spec.adapters", "duplicate"),
    # --- schema: input the schema once let through, that broke the workload (a Job or Service the API server refused)
    Case("negative_cpu", FT8, (("spec.resources.cpu", "-1"),), "schema", "spec.resources.cpu"),
    Case("gpu_product_not_a_label_value", FT8, (("spec.resources.gpuProduct", "NVIDIA H100 (80GB)"),), "schema",
         "spec.resources.gpuProduct"),
    Case("node_selector_value_not_a_label_value", FT8, (("spec.resources.nodeSelector", {"zone": "eu west"}),),
         "schema", "spec.resources.nodeSelector.zone"),
    Case("queue_name_longer_than_a_label", FT8, (("spec.queue", {"name": "q" * 64}),), "schema", "spec.queue.name"),
    Case("toleration_key_invalid", FT8, (("spec.resources.tolerations", [{"key": "bad key!", "operator": "Exists"}]),),
         "schema", "spec.resources.tolerations[0].key"),
    # --- cel: cross-field rules
    Case("toleration_exists_with_value", FT8,
         (("spec.resources.tolerations", [{"key": "gpu", "operator": "Exists", "value": "x"}]),), "cel",
         "spec.resources.tolerations[0].value", "Exists"),
    Case("toleration_seconds_without_noexecute", FT8,
         (("spec.resources.tolerations", [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule",
                                           "tolerationSeconds": 60}]),), "cel",
         "spec.resources.tolerations[0].tolerationSeconds", "NoExecute"),
    Case("node_selector_key_invalid", FT8, (("spec.resources.nodeSelector", {"bad key": "x"}),), "cel",
         "spec.resources.nodeSelector", "label keys"),
    Case("pvc_base_model_without_claim", FT8, (("spec.model.base_model", "pvc:///x"),), "cel",
         "spec.model.base_model", "pvc://<claim>/<path>"),
    Case("pvc_base_model_bad_claim", FT8, (("spec.model.base_model", "pvc://Bad_Claim/x"),), "cel",
         "spec.model.base_model", "PersistentVolumeClaim"),
    Case("pvc_base_model_climbs_out", FT8, (("spec.model.base_model", "pvc://models/../../etc"),), "cel",
         "spec.model.base_model", ".."),
    Case("output_path_climbs_out", FT8, (("spec.output.pvc.path", "team-a/../../team-b"),), "cel",
         "spec.output.pvc.path", ".."),
    Case("dataset_path_climbs_out", FT8, (("spec.dataset.pvc.path", "../secrets.jsonl"),), "cel",
         "spec.dataset.pvc.path", ".."),
    Case("serve_pvc_adapter_climbs_out", SV8, (("spec.adapters.0", {"name": "a", "uri": "pvc://adapters/../x"}),),
         "cel", "spec.adapters[0].uri", ".."),
    Case("serve_pvc_model_bad_claim", SV8, (("spec.model.base_model", "pvc://../x"),), "cel",
         "spec.model.base_model", "PersistentVolumeClaim"),
    Case("both_4bit_and_8bit", FT70, (("spec.quantization.load_in_8bit", True),), "cel", "spec.quantization",
         "mutually exclusive"),
    Case("multi_node_cpu", FT8, (("spec.resources.gpusPerNode", 0), ("spec.resources.nodes", 2)), "cel",
         "spec.resources.nodes", "gpusPerNode"),
    Case("two_dataset_sources", FT8, (("spec.dataset.http", {"url": "https://example.com/d.jsonl"}),), "cel",
         "spec.dataset", "exactly one"),
    Case("no_dataset_source", FT8, (("spec.dataset.pvc", DELETE),), "cel", "spec.dataset", "exactly one"),
    Case("no_output", FT8, (("spec.output", {}),), "cel", "spec.output", "exactly one"),
    Case("bf16_and_fp16", FT8, (("spec.training.bf16", True), ("spec.training.fp16", True)), "cel",
         "spec.training", "mutually exclusive"),
    Case("no_epochs_no_steps", FT8, (("spec.training.num_train_epochs", 0),), "cel", "spec.training",
         "max_steps"),
    Case("serve_adapter_ref_and_uri", SV8, (("spec.adapters.0.uri", "pvc://adapters/a"),), "cel",
         "spec.adapters[0]", "exactly one"),
    # --- semantic: needs the model catalog and the memory planner
    Case("70b_on_one_24gb_gpu", FT70, (("spec.resources.gpusPerNode", 1), ("spec.resources.gpuProduct", "NVIDIA-L4")),
         "semantic", "spec.resources.gpusPerNode", "at least 7 GPUs"),
    Case("70b_bf16_on_one_h100", FT70, (("spec.quantization.load_in_4bit", False), ("spec.resources.gpusPerNode", 1)),
         "semantic", "spec.resources.gpusPerNode", "at least"),
    Case("seq_beyond_llama3_context", FT8, (("spec.model.base_model", "meta-llama/Meta-Llama-3-8B-Instruct"),
                                            ("spec.training.max_seq_length", 16384)),
         "semantic", "spec.training.max_seq_length", "8192"),
    Case("target_module_typo", FT8, (("spec.lora.target_modules.0", "q_prj"),), "semantic",
         "spec.lora.target_modules[0]", 'did you mean "q_proj"'),
    Case("eval_without_split", FT8, (("spec.training.eval_strategy", "steps"),), "semantic",
         "spec.dataset.evalFraction"),
    Case("warmup_longer_than_run", FT8, (("spec.training.max_steps", 100), ("spec.training.warmup_steps", 100)),
         "semantic", "spec.training.warmup_steps"),
    Case("serve_tp_not_divisor", SV8, (("spec.vllm.tensor_parallel_size", 3),), "semantic",
         "spec.vllm.tensor_parallel_size", "32 attention heads"),
    Case("serve_len_beyond_context", SV8, (("spec.vllm.max_model_len", 200000),), "semantic",
         "spec.vllm.max_model_len", "131072"),
    Case("serve_70b_bf16_on_one_gpu", SV8, (("spec.model.base_model", "meta-llama/Llama-3.3-70B-Instruct"),
                                            ("spec.vllm.max_model_len", DELETE)),
         "semantic", "spec.vllm.tensor_parallel_size", "tensor_parallel_size >= 4"),
]
