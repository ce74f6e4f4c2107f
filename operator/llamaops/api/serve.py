"""The LlamaServe resource: a vLLM Deployment serving a base model and LoRA adapters."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator

from llamaops.api.finetune import SchedulingSpec
from llamaops.api.meta import (
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    QUANTITY_PATTERN,
    KubeModel,
    Resource,
    SecretKeyRef,
    SecretRef,
    SeedModel,
    StatusBase,
    cel,
    pvc_uri_rules,
    section,
    validations,
)

# vLLM accepts only these values for --max-lora-rank.
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
VLLM_LORA_RANKS: tuple[int, ...] = get_args(LoraRank)


class ServeModelSpec(SeedModel):
    """The base model to serve (the seed's `model:` section)."""

    model_config = SeedModel.model_config | {"json_schema_extra": validations(*pvc_uri_rules("base_model"))}

    base_model: str = Field(
        min_length=1, max_length=512,
        description="Hugging Face repo id, an absolute path in the image, or pvc://<claim>/<path>. Adapters must "
                    "have been trained on exactly this base model.")
    trust_remote_code: bool = False
    revision: str | None = Field(None, max_length=256)


class VllmSpec(SeedModel):
    """`vllm serve` flags, keyed as the seed's command spells them (dashes become underscores)."""

    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs per replica; must divide the attention heads.")
    max_model_len: int | None = Field(None, ge=128, le=1048576, description="Context length; unset is the model's.")
    port: int = Field(8000, ge=1024, le=65535, description="Port of the OpenAI-compatible server.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    max_num_seqs: int | None = Field(None, ge=1, le=65536, description="Concurrent sequences per replica.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quantization: Literal["awq", "gptq", "fp8", "bitsandbytes", "compressed-tensors"] | None = None
    served_model_name: str | None = Field(None, max_length=256, description="Name clients use for the base model.")
    max_loras: int | None = Field(None, ge=1, le=256, description="Adapters in one batch; unset is the adapter count.")
    max_lora_rank: LoraRank | None = Field(None, description="Largest adapter rank; unset is derived from the adapters.")
    max_cpu_loras: int | None = Field(None, ge=1, le=1024)
    enable_prefix_caching: bool | None = None
    chat_template: str | None = Field(None, max_length=65536,
                                      description="Jinja chat template; overrides the one built from systemPrompt.")
    extra_args: list[str] | None = Field(None, max_length=64, description="Further `vllm serve` arguments.")


class OllamaSpec(SeedModel):
    """Ollama's settings (runtime: ollama); unset keys keep Ollama's defaults."""

    served_model_name: str | None = Field(
        None, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
        description="Name of the base model in Ollama (each adapter is a model named after it); unset is the "
                    "LlamaServe's name.")
    context_length: int | None = Field(None, ge=128, le=1048576,
                                       description="Context window (OLLAMA_CONTEXT_LENGTH); unset is Ollama's.")
    gpus: int = Field(1, ge=0, le=16, description="GPUs per replica (0 serves on the CPU).")


class ServeAdapter(KubeModel):
    """One LoRA adapter to serve: from a LlamaFineTune of this namespace, or by location."""

    model_config = KubeModel.model_config | {
        "json_schema_extra": validations(
            cel("has(self.fineTuneRef) != has(self.uri)", "set exactly one of fineTuneRef or uri",
                reason="FieldValueRequired"),
            *pvc_uri_rules("uri"),
        )
    }

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63,
                      description="Model name clients send in requests (the vLLM LoRA module name).")
    fine_tune_ref: str | None = Field(None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253,
                                      description="Name of a LlamaFineTune in this namespace; its adapter is used "
                                                  "once it Succeeded.")
    uri: str | None = Field(None, pattern=r"^(pvc://[a-z0-9][-a-z0-9]*[a-z0-9]?/.+|s3://.+|hf://.+)$",
                            max_length=2048, description="pvc://<claim>/<path>, s3://bucket/prefix or hf://org/repo.")
    r: int | None = Field(None, ge=1, le=1024, description="Rank of a uri adapter (fineTuneRef adapters report theirs).")
    base_model: str | None = Field(None, min_length=1, max_length=512,
                                   description="Base model a uri adapter was trained on; refused when it is not the "
                                               "served one (fineTuneRef adapters report theirs).")


class ServeResources(SchedulingSpec):
    """Placement of each replica; the GPU count is vllm.tensor_parallel_size."""


class S3Access(KubeModel):
    """How the init container reaches s3:// adapters given by uri (fineTuneRef adapters use their run's output.s3)."""

    endpoint: str | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=2048,
                                 description="S3-compatible endpoint (MinIO, Ceph); unset means AWS.")
    region: str | None = Field(None, max_length=64)
    credentials_secret: SecretRef | None = Field(
        None, description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; unset uses the pod's identity.")


class RollingUpdateSpec(KubeModel):
    """The Deployment's rolling update: by default a new replica is Ready before an old one goes."""

    model_config = KubeModel.model_config | {
        "json_schema_extra": validations(
            cel("self.maxSurge > 0 || self.maxUnavailable > 0",
                "maxSurge and maxUnavailable cannot both be 0", reason="FieldValueInvalid"),
        )
    }

    max_surge: int = Field(1, ge=0, le=1000, description="Extra replicas (each with its GPUs) during a rollout.")
    max_unavailable: int = Field(0, ge=0, le=1000,
                                 description="Replicas that may be down during a rollout; 0 keeps full capacity.")


class DisruptionBudgetSpec(KubeModel):
    """A PodDisruptionBudget for the replicas (node drains, cluster upgrades)."""

    model_config = KubeModel.model_config | {
        "json_schema_extra": validations(
            cel("has(self.minAvailable) != has(self.maxUnavailable)",
                "set exactly one of minAvailable or maxUnavailable", reason="FieldValueRequired"),
        )
    }

    min_available: int | None = Field(None, ge=0, le=1000)
    max_unavailable: int | None = Field(None, ge=0, le=1000)


class PodsMetric(KubeModel):
    name: str = Field(min_length=1, max_length=253, description="Metric name as the adapter exposes it, e.g. "
                                                                "vllm:num_requests_waiting.")
    average_value: str = Field(pattern=QUANTITY_PATTERN, max_length=64,
                               description="Target per-pod average (a quantity, e.g. \"5\").")


class AutoscalingSpec(KubeModel):
    """A HorizontalPodAutoscaler; it then owns the replica count (spec.replicas is ignored)."""

    model_config = KubeModel.model_config | {
        "json_schema_extra": validations(
            cel("self.maxReplicas >= self.minReplicas", "maxReplicas must be >= minReplicas",
                field_path=".maxReplicas", reason="FieldValueInvalid"),
            cel("has(self.targetCPUUtilization) || has(self.metric)",
                "set targetCPUUtilization or metric (e.g. vllm:num_requests_waiting)", reason="FieldValueRequired"),
        )
    }

    min_replicas: int = Field(1, ge=1, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    target_cpu_utilization: int | None = Field(None, alias="targetCPUUtilization", ge=1, le=100,
                                               description="Average CPU utilisation (percent) to keep.")
    metric: PodsMetric | None = Field(None, description="A per-pod custom metric (needs a metrics adapter).")


class LlamaServeSpec(KubeModel):
    model: ServeModelSpec
    adapters: list[ServeAdapter] = Field(
        default_factory=list, max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    vllm: VllmSpec = section(VllmSpec)
    ollama: OllamaSpec | None = Field(None, description="Ollama's settings, for runtime: ollama.")
    system_prompt: str | None = Field(
        None, max_length=65536,
        description="System prompt applied by default; unset takes the one the adapters were trained with.")
    replicas: int = Field(1, ge=0, le=1000)
    resources: ServeResources = section(ServeResources)
    image: str | None = Field(None, max_length=1024, description="Server image override (the runtime's by default).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[SecretRef] | None = Field(None, max_length=16)
    hf_token_secret_ref: SecretKeyRef | None = None
    api_key_secret_ref: SecretKeyRef | None = Field(None, description="Secret key with the API key clients must send.")
    # Checked against the registered runtimes (llamaops.builders.serve.runtime); the CRD's enum lists them.
    runtime: str = Field("vllm", pattern=DNS_LABEL_PATTERN, max_length=63,
                         description="Serving runtime: vllm (the seed's `vllm serve`), or ollama (Modelfiles).")
    startup_timeout_seconds: int = Field(
        1800, ge=60, le=86400,
        description="How long a replica may take to download and load the weights before it is restarted "
                    "(startupProbe budget); 70B weights take tens of minutes.")
    rolling_update: RollingUpdateSpec = section(RollingUpdateSpec)
    pod_disruption_budget: DisruptionBudgetSpec | None = None
    autoscaling: AutoscalingSpec | None = None
    model_cache_pvc: str | None = Field(None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253,
                                        description="Claim mounted at HF_HOME for downloaded weights; unset uses the "
                                                    "operator's default (LLAMAOPS_MODEL_CACHE_PVC), else an emptyDir.")
    s3: S3Access | None = Field(None, description="Access to s3:// adapters given by uri.")

    @field_validator("adapters")
    @classmethod
    def _unique_names(cls, adapters: list[ServeAdapter]) -> list[ServeAdapter]:
        # The CRD says the same with x-kubernetes-list-map-keys: [name].
        seen: set[str] = set()
        for adapter in adapters:
            if adapter.name in seen:
                raise ValueError(f'duplicate adapter name "{adapter.name}"')
            seen.add(adapter.name)
        return adapters


ServePhase = Literal["WaitingForAdapters", "Deploying", "Ready", "Degraded", "Failed"]


class ServedAdapterStatus(KubeModel):
    name: str
    uri: str
    source: str | None = Field(None, description="LlamaFineTune/<name>, or uri.")
    base_model: str | None = None
    r: int | None = None
    system_prompt: str | None = None
    revision: str | None = Field(None, description="When the run produced it (a re-trained run rolls out again).")


class LlamaServeStatus(StatusBase):
    phase: ServePhase | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    updated_replicas: int | None = None
    adapters: list[ServedAdapterStatus] | None = None
    adapter_names: str | None = Field(None, description="Comma-separated adapter names, for kubectl get.")
    endpoint: str | None = None


class LlamaServe(Resource[LlamaServeSpec, LlamaServeStatus]):
    kind: Literal["LlamaServe"] = "LlamaServe"
