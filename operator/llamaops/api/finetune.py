"""The LlamaFineTune resource: one LoRA/QLoRA training run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llamaops.api.contract import output_subpath
from llamaops.api.meta import (
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    LABEL_KEY_PATTERN,
    KubeModel,
    LabelValue,
    Quantity,
    Resource,
    SecretKeyRef,
    SecretRef,
    SeedModel,
    StatusBase,
    Timestamp,
    Toleration,
    cel,
    no_parent_rule,
    pvc_uri_rules,
    section,
    validations,
)

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ---------------------------------------------------------------- seed sections


class ModelSpec(SeedModel):
    """The base model (the seed's `model:` section)."""

    model_config = SeedModel.model_config | {"json_schema_extra": validations(*pvc_uri_rules("base_model"))}

    base_model: str = Field(
        min_length=1, max_length=512,
        description="Hugging Face repo id (meta-llama/Llama-3.1-8B-Instruct), an absolute path inside the "
                    "trainer image, or pvc://<claim>/<path> on a PersistentVolumeClaim of this namespace.",
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model repo.")
    revision: str | None = Field(None, max_length=256, description="Git revision (branch, tag or commit) of the repo.")
    torch_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the non-quantized weights.")
    attn_implementation: Literal["flash_attention_2", "sdpa", "eager"] | None = Field(
        None, description="Attention kernel; unset picks flash_attention_2 when installed, else sdpa.")


class LoraSpec(SeedModel):
    """peft.LoraConfig (the seed's `lora:` section); task_type is always CAUSAL_LM."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, le=16384, description="LoRA scaling numerator (scale = lora_alpha / r).")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_PROJECTIONS), min_length=1, max_length=64,
        description='Module names to adapt, or ["all-linear"].',
        json_schema_extra={"default": LLAMA_PROJECTIONS, "items": {"type": "string", "minLength": 1, "maxLength": 128}},
    )
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling lora_alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] | None = Field(
        None, max_length=16, description="Extra modules trained in full and saved with the adapter (e.g. lm_head).")
    layers_to_transform: list[int] | None = Field(None, max_length=512, description="Only adapt these layer indices.")
    rank_pattern: dict[str, int] | None = Field(None, description="Per-module rank overrides (regex -> r).")
    alpha_pattern: dict[str, int] | None = Field(None, description="Per-module alpha overrides (regex -> alpha).")
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora", "loftq", "eva"] = Field(
        "default", description='LoRA initialisation ("default" is peft\'s init_lora_weights=True).')
    fan_in_fan_out: bool = Field(False, description="Set for Conv1D-style layers; never for Llama.")

    @property
    def exported_rank(self) -> int:
        """The largest rank of the adapter the trainer exports (what vLLM's --max-lora-rank must cover).

        PiSSA and OLoRA rewrite the base weights; their adapter is converted at export to plain LoRA on the
        original base, at twice the rank (peft's path_initial_model_for_weight_conversion).
        """
        rank = max([self.r, *(self.rank_pattern or {}).values()])
        return 2 * rank if self.init_lora_weights in ("pissa", "olora") else rank


class QuantizationSpec(SeedModel):
    """transformers.BitsAndBytesConfig (the seed's `quantization:` section): QLoRA when 4-bit."""

    model_config = SeedModel.model_config | {
        "json_schema_extra": validations(
            cel("!(self.load_in_4bit && self.load_in_8bit)",
                "load_in_4bit and load_in_8bit are mutually exclusive: pick one", reason="FieldValueInvalid"),
        )
    }

    load_in_4bit: bool = Field(False, description="Load the base model in 4 bits (QLoRA).")
    load_in_8bit: bool = Field(False, description="Load the base model in 8 bits (LLM.int8).")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the matmuls on de-quantized 4-bit weights.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(False, description="Quantize the quantization constants too.")
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] | None = Field(
        None, description="Storage dtype of packed 4-bit weights; unset means the compute dtype on several GPUs "
                          "(needed to shard them) and uint8 on one.")
    llm_int8_threshold: float = Field(6.0, ge=0, description="Outlier threshold of LLM.int8.")
    llm_int8_skip_modules: list[str] | None = Field(None, max_length=64, description="Modules kept unquantized.")
    llm_int8_enable_fp32_cpu_offload: bool = Field(False, description="Offload unquantized modules to CPU in fp32.")

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
]
Optimizer = Literal[
    "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_8bit", "adamw_bnb_8bit",
    "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "paged_lion_8bit", "lion_32bit",
]


class TrainingSpec(SeedModel):
    """transformers.TrainingArguments plus the SFT knobs (the seed's `training:` section)."""

    model_config = SeedModel.model_config | {
        "json_schema_extra": validations(
            cel("!(has(self.bf16) && self.bf16 && self.fp16)",
                "bf16 and fp16 are mutually exclusive: pick one", reason="FieldValueInvalid"),
            cel("self.max_steps > 0 || self.num_train_epochs > 0",
                "set num_train_epochs > 0 or max_steps > 0", reason="FieldValueInvalid"),
            cel("self.save_strategy != 'steps' || self.save_steps >= 1",
                "save_steps must be >= 1 when save_strategy is steps", reason="FieldValueInvalid"),
        )
    }

    num_train_epochs: float = Field(1.0, ge=0, le=1000, description="Passes over the dataset (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Total optimizer steps; -1 trains for num_train_epochs.")
    per_device_train_batch_size: int = Field(1, ge=1, le=1024, description="Sequences per GPU per micro-step.")
    per_device_eval_batch_size: int = Field(1, ge=1, le=1024, description="Sequences per GPU when evaluating.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="Micro-steps per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    max_seq_length: int = Field(2048, ge=32, le=1048576, description="Tokens per packed training sequence.")
    packing: bool = Field(True, description="Pack several examples into each sequence (attention kept per example).")
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of steps spent warming up.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps; overrides warmup_ratio when > 0.")
    lr_scheduler_type: Scheduler = Field("linear", description="Learning-rate schedule.")
    optim: Optimizer = Field("adamw_torch", description="Optimizer.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0, le=1)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations (use_reentrant=False): less memory, about 1.3-1.4x the step "
                          "time. Unset: on only when the GPU memory plan needs it to fit (off on the CPU).")
    parallelism: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Several GPUs: ddp replicates the model on each, fsdp shards weights, adapters and "
                            "optimizer state over all of them (FSDP2, full shard; with 4-bit quantization too). "
                            "auto: ddp where the memory plan fits one GPU, else fsdp.")
    bf16: bool | None = Field(None, description="bfloat16 mixed precision; unset means on where the GPU supports it.")
    fp16: bool = Field(False, description="float16 mixed precision (GPUs without bf16).")
    seed: int = Field(42, ge=0, le=2**32 - 1)
    logging_steps: int = Field(10, ge=1, description="Report loss and progress every N optimizer steps.")
    save_strategy: Literal["steps", "epoch", "no"] = Field("steps", description="When to checkpoint.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every N steps (resume starts from the newest).")
    save_total_limit: int = Field(3, ge=1, le=1000, description="Checkpoints kept on the output volume.")
    eval_strategy: Literal["no", "steps", "epoch"] = Field("no", description="When to evaluate on the held-out split.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (defaults to logging_steps).")
    dataloader_num_workers: int = Field(0, ge=0, le=64)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, max_length=3,
        description="Experiment trackers: tensorboard writes event files beside metrics.jsonl (<output>/tensorboard), "
                    "mlflow and wandb log to the server their variables name (spec.trackingSecretRef). Empty: none.")


# ------------------------------------------------------ Kubernetes-facing sections


class PvcSource(KubeModel):
    model_config = KubeModel.model_config | {"json_schema_extra": validations(no_parent_rule("path"))}

    claim_name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="PersistentVolumeClaim name.")
    path: str = Field(min_length=1, max_length=1024, pattern=r"^[^/]",
                      description="Path inside the claim (relative): a JSONL file or a directory of them.")


class HttpSource(KubeModel):
    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2048,
                     description="HTTP(S) URL of a JSONL file. Credentials in it (user:password@, a signed query) "
                                 "are never printed, but they are part of the spec: prefer authSecretRef.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Expected SHA-256 of the download.")
    auth_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key whose value is sent as the download's Authorization header (e.g. "
                          "\"Bearer <token>\"): the credential stays in the Secret.")


class S3Location(KubeModel):
    uri: str = Field(pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$", max_length=2048,
                     description="s3://bucket/key (a file) or s3://bucket/prefix/ (a directory).")
    endpoint: str | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=2048,
                                 description="S3-compatible endpoint (MinIO, Ceph); unset means AWS.")
    region: str | None = Field(None, max_length=64)
    credentials_secret: SecretRef | None = Field(
        None, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; unset uses the pod's identity.")


class HuggingFaceDataset(KubeModel):
    name: str = Field(min_length=1, max_length=256, description="Dataset repo id on the Hub.")
    config: str | None = Field(None, max_length=256, description="Dataset configuration (subset).")
    split: str = Field("train", min_length=1, max_length=256)
    revision: str | None = Field(None, max_length=256)


class DatasetSpec(KubeModel):
    """Where the training data is and how it is shaped. Exactly one source."""

    model_config = KubeModel.model_config | {
        "json_schema_extra": validations(
            cel("[has(self.pvc), has(self.http), has(self.s3), has(self.huggingFace)].filter(x, x).size() == 1",
                "set exactly one dataset source: pvc, http, s3 or huggingFace", reason="FieldValueRequired"),
        )
    }

    pvc: PvcSource | None = None
    http: HttpSource | None = None
    s3: S3Location | None = None
    hugging_face: HuggingFaceDataset | None = None
    format: Literal["messages", "prompt-completion"] = Field(
        "messages", description='"messages": chat turns [{role, content}]; "prompt-completion": two text fields.')
    messages_field: str = Field("messages", min_length=1, max_length=128)
    prompt_field: str = Field("prompt", min_length=1, max_length=128)
    completion_field: str = Field("completion", min_length=1, max_length=128)
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Share of examples held out for evaluation.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many examples.")

    @property
    def source(self) -> str:
        for name in ("pvc", "http", "s3", "hugging_face"):
            if getattr(self, name) is not None:
                return name
        return "none"


NODE_SELECTOR_KEYS = cel(
    f"!has(self.nodeSelector) || self.nodeSelector.all(k, k.size() <= 316 && k.matches('{LABEL_KEY_PATTERN}'))",
    "nodeSelector keys are label keys: [prefix/]name, the name up to 63 characters, alphanumeric at both ends",
    field_path=".nodeSelector", reason="FieldValueInvalid")


class SchedulingSpec(KubeModel):
    """Placement shared by training and serving pods."""

    model_config = KubeModel.model_config | {"json_schema_extra": validations(NODE_SELECTOR_KEYS)}

    gpu_product: LabelValue | None = Field(
        None, description="Value of the nvidia.com/gpu.product node label to run on (e.g. NVIDIA-H100-80GB-HBM3).")
    gpu_memory_gb: int | None = Field(
        None, alias="gpuMemoryGB", ge=1, le=4096,
        description="Memory of one GPU, for the memory plan; unset means it is looked up from gpuProduct.")
    node_selector: dict[str, LabelValue] | None = Field(None, max_length=32, description="Extra node labels to match.")
    tolerations: list[Toleration] | None = Field(None, max_length=32)
    cpu: Quantity | None = Field(None, description="CPU request (and limit) per pod.")
    memory: Quantity | None = Field(None, description="Memory request (and limit) per pod.")
    shm_size: Quantity = Field("16Gi", description="Size of the in-memory /dev/shm (NCCL needs more than 64Mi).")
    priority_class_name: str | None = Field(None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)


class TrainingResources(SchedulingSpec):
    model_config = SchedulingSpec.model_config | {
        "json_schema_extra": validations(
            NODE_SELECTOR_KEYS,
            cel("self.nodes == 1 || self.gpusPerNode >= 1",
                "nodes > 1 needs gpusPerNode >= 1: multi-node training runs on GPUs",
                field_path=".nodes", reason="FieldValueInvalid"),
        )
    }

    gpus_per_node: int = Field(1, ge=0, le=16, description="GPUs per pod (one pod per node; 0 trains on CPU).")
    nodes: int = Field(1, ge=1, le=256, description="Pods (nodes) in the gang, one torchrun node each.")

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes


class PvcOutput(KubeModel):
    model_config = KubeModel.model_config | {"json_schema_extra": validations(no_parent_rule("path"))}

    claim_name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    path: str | None = Field(None, max_length=1024, pattern=r"^[^/]",
                             description="Directory inside the claim; unset means <namespace>/<name>.")


class OutputSpec(KubeModel):
    """Where checkpoints and the adapter go. Exactly one destination."""

    model_config = KubeModel.model_config | {
        "json_schema_extra": validations(
            cel("has(self.pvc) != has(self.s3)", "set exactly one output: pvc or s3", reason="FieldValueRequired"),
        )
    }

    pvc: PvcOutput | None = None
    s3: S3Location | None = None


class QueueSpec(KubeModel):
    priority: int = Field(0, ge=-1000000, le=1000000, description="Higher runs first; ties go to the oldest.")
    name: str | None = Field(
        None, pattern=DNS_LABEL_PATTERN, max_length=63,
        description="Queue to join: in Kueue mode the LocalQueue of this namespace (a Job label carries it, so at "
                    "most 63 characters); in built-in mode informational.")


class FineTuneSpec(KubeModel):
    model_config = KubeModel.model_config | {
        "json_schema_extra": validations(
            cel("self.model.base_model == oldSelf.model.base_model",
                "model.base_model is immutable: create a new LlamaFineTune for another base model",
                field_path=".model.base_model", reason="FieldValueForbidden"),
            cel("self.output == oldSelf.output",
                "output is immutable: the adapter and checkpoints would be orphaned",
                field_path=".output", reason="FieldValueForbidden"),
        )
    }

    model: ModelSpec
    lora: LoraSpec = section(LoraSpec)
    quantization: QuantizationSpec = section(QuantizationSpec)
    training: TrainingSpec = section(TrainingSpec)
    system_prompt: str | None = Field(
        None, max_length=65536,
        description="System prompt applied to every training example; LlamaServe reuses it for serving.")
    dataset: DatasetSpec
    resources: TrainingResources = section(TrainingResources)
    output: OutputSpec
    queue: QueueSpec = section(QueueSpec)
    suspend: bool = Field(False, description="Hold the run in the queue (or stop it and keep its checkpoints).")
    hf_token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a Hugging Face token (HF_TOKEN), for gated models and datasets.")
    tracking_secret_ref: SecretRef | None = Field(
        None, description="Secret whose keys become the trainer's environment for training.report_to: "
                          "WANDB_API_KEY, WANDB_PROJECT, MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN, ...")
    image: str | None = Field(None, max_length=1024, description="Trainer image override.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[SecretRef] | None = Field(None, max_length=16)
    max_restarts: int = Field(3, ge=0, le=100, description="Whole-gang restarts before the run fails.")
    active_deadline_seconds: int | None = Field(None, ge=1, description="Fail the run after this long running.")


# ----------------------------------------------------------------------- status

FineTunePhase = Literal["Pending", "Queued", "Admitted", "Running", "Succeeded", "Failed", "Suspended"]


class Progress(KubeModel):
    step: int = Field(0, ge=0)
    total_steps: int | None = Field(None, ge=0)
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: int | None = None
    step_seconds: float | None = Field(
        None, ge=0, description="The slowest optimizer step of the run so far, in seconds: the training pods' "
                                "termination grace period (to finish a step and checkpoint) is sized from it.")
    display: str | None = Field(None, description="step/totalSteps, for kubectl get.")
    updated_at: Timestamp | None = None


class AdapterReport(KubeModel):
    """What the trainer reports of the adapter it saved (its report ConfigMap), checked by the operator."""

    base_model: str = Field(min_length=1, max_length=512)
    r: int = Field(ge=1, le=4096, description="The exported adapter's largest rank.")
    lora_alpha: int | None = Field(None, gt=0, le=16384)
    uri: str | None = Field(None, pattern=r"^s3://[^\s]+$", max_length=2048,
                            description="Where an S3 output's adapter was uploaded.")
    spec_hash: str | None = Field(None, max_length=64, description="contract.spec_hash of the spec it was trained "
                                                                   "from: a report of an earlier spec is ignored.")


class AdapterStatus(KubeModel):
    uri: str | None = Field(None, description="pvc://<claim>/<path> or s3://bucket/prefix of the saved adapter.")
    base_model: str
    r: int
    lora_alpha: int | None = None
    system_prompt: str | None = None


class FineTuneStatus(StatusBase):
    phase: FineTunePhase | None = None
    queue_position: int | None = Field(None, ge=1)
    progress: Progress | None = None
    adapter: AdapterStatus | None = None
    job_name: str | None = None
    assigned_nodes: list[str] | None = Field(None, description="Nodes the built-in queue admitted the run onto.")
    run_hash: str | None = Field(None, description="Hash of the spec (less queue and suspend) the workload runs.")
    spec_hash: str | None = Field(None, description="Hash of the trained sections, as the adapter records it.")
    restarts: int | None = Field(None, description="Whole-gang restarts after infrastructure failures.")
    start_time: Timestamp | None = None
    completion_time: Timestamp | None = None


class LlamaFineTune(Resource[FineTuneSpec, FineTuneStatus]):
    kind: Literal["LlamaFineTune"] = "LlamaFineTune"

    def adapter_uri(self) -> str | None:
        """Where the trainer leaves the finished adapter of a PVC output (an S3 output reports its own)."""
        out = self.spec.output
        if out.pvc is None:
            return None
        sub = output_subpath(self.metadata.namespace or "default", self.metadata.name or "", out.pvc.path)
        return f"pvc://{out.pvc.claim_name}/{sub}/adapter"
