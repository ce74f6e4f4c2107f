"""Pure decisions over typed views of our objects: `finetune` (a run and its Job), `serve` (which adapters a
LlamaServe serves, and its rollout's phase). No I/O and no kopf: the handlers read, call these, and write."""
