"""The LlamaOps trainer: the program that runs inside each training pod.

It reads a LlamaFineTune spec (llamaops.api), fine-tunes the base model with
LoRA/QLoRA through Hugging Face's Trainer, reports progress on the object's
status and writes the adapter in the layout of llamaops.api.contract.
"""

__version__ = "0.1.0"
