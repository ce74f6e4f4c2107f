"""Operator settings, from the environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from llamaops import queue
from llamaops.state.policy import Policy

DEFAULT_TRAINER_IMAGE = "ghcr.io/llamaops/trainer:0.1.0"
# The vLLM release whose argument parser bench/vllm_args.py checks our `vllm serve` arguments against.
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"
DEFAULT_OLLAMA_IMAGE = "ollama/ollama:0.17.4"  # the version hack/build-ollama.sh builds and the tests run
# Fetches s3:// adapters for serving (`aws s3 sync` in an init container).
DEFAULT_ADAPTER_FETCH_IMAGE = "amazon/aws-cli:2.31.13"


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    queue_mode: str = "builtin"  # the queue policy, by its registered name (llamaops.queue)
    kueue_default_queue: str = "default"  # LocalQueue for runs that name none
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    vllm_image: str = DEFAULT_VLLM_IMAGE
    ollama_image: str = DEFAULT_OLLAMA_IMAGE
    adapter_fetch_image: str = DEFAULT_ADAPTER_FETCH_IMAGE
    image_pull_policy: str = "IfNotPresent"
    backfill_limit: int = 3
    admission_interval: float = 2.0  # seconds between admission passes when nothing changes
    model_cache_pvc: str | None = None  # a claim per namespace for HF_HOME, shared by runs
    liveness_port: int = 8080
    # Demo mode: every training pod goes to this dev node (llamaops_dev.devnode: pods as local processes),
    # trains on its CPU (gloo, no GPUs requested) and is admitted without counting GPUs.
    dev_node: str | None = None
    metrics_port: int = 0  # Prometheus /metrics; 0: off (parallel local operators never collide)
    # An admitted run whose pods cannot start or be scheduled is told this long after (its GPUs go back); a
    # node NotReady this long is lost (Kubernetes' own taint-based eviction also waits 300 s).
    stuck_after: float = 300.0
    node_lost_after: float = 300.0
    # NetworkPolicies for the serving port and the training gang's rendezvous (chart: networkPolicies.enabled).
    network_policies: bool = True
    # What a spec may ask for on a shared cluster (chart: policy.*; state/policy.py). No allowed images given:
    # the operator's own (trainer, vLLM, Ollama); "*" allows any.
    allowed_images: tuple[str, ...] = ()
    allowed_priority_classes: tuple[str, ...] = ()
    max_priority: int = 1000

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        mode = env.get("LLAMAOPS_QUEUE_MODE", "builtin")
        if mode not in queue.names():
            raise ValueError(f"LLAMAOPS_QUEUE_MODE must be one of {', '.join(queue.names())}, not {mode!r}")
        return cls(
            namespaces=_csv(env.get("LLAMAOPS_NAMESPACES", "")),
            queue_mode=mode,
            kueue_default_queue=env.get("LLAMAOPS_KUEUE_QUEUE", "default"),
            trainer_image=env.get("LLAMAOPS_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE),
            vllm_image=env.get("LLAMAOPS_VLLM_IMAGE", DEFAULT_VLLM_IMAGE),
            ollama_image=env.get("LLAMAOPS_OLLAMA_IMAGE", DEFAULT_OLLAMA_IMAGE),
            adapter_fetch_image=env.get("LLAMAOPS_ADAPTER_FETCH_IMAGE", DEFAULT_ADAPTER_FETCH_IMAGE),
            image_pull_policy=env.get("LLAMAOPS_IMAGE_PULL_POLICY", "IfNotPresent"),
            backfill_limit=int(env.get("LLAMAOPS_BACKFILL_LIMIT", "3")),
            admission_interval=float(env.get("LLAMAOPS_ADMISSION_INTERVAL", "2")),
            model_cache_pvc=env.get("LLAMAOPS_MODEL_CACHE_PVC") or None,
            liveness_port=int(env.get("LLAMAOPS_LIVENESS_PORT", "8080")),
            dev_node=env.get("LLAMAOPS_DEV_NODE") or None,
            metrics_port=int(env.get("LLAMAOPS_METRICS_PORT") or "0"),
            stuck_after=float(env.get("LLAMAOPS_STUCK_AFTER", "300")),
            node_lost_after=float(env.get("LLAMAOPS_NODE_LOST_AFTER", "300")),
            network_policies=env.get("LLAMAOPS_NETWORK_POLICIES", "true").lower() not in ("false", "0", "no"),
            allowed_images=_csv(env.get("LLAMAOPS_ALLOWED_IMAGES", "")),
            allowed_priority_classes=_csv(env.get("LLAMAOPS_ALLOWED_PRIORITY_CLASSES", "")),
            max_priority=int(env.get("LLAMAOPS_MAX_PRIORITY", "1000")),
        )

    def spec_policy(self) -> Policy:
        """What a spec may ask for: the allowed images default to the operator's own."""
        images = self.allowed_images or (self.trainer_image, self.vllm_image, self.ollama_image)
        return Policy(images, self.allowed_priority_classes, self.max_priority)

    def queue_policy(self) -> queue.QueuePolicy:
        """The queue policy these settings select, configured by them."""
        return queue.create(self.queue_mode, queue.PolicyConfig(backfill_limit=self.backfill_limit,
                                                                default_queue=self.kueue_default_queue))
