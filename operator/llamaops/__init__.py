"""LlamaOps: fine-tune Llama models with LoRA/QLoRA on Kubernetes and serve the adapters with vLLM."""

__version__ = "0.1.0"
