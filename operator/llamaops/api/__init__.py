"""The LlamaOps API: spec and status models of LlamaFineTune and LlamaServe.

No Kubernetes client and no kopf here: the operator, the trainer and the CLI
all parse the same models.
"""

from llamaops.api.finetune import FineTuneSpec, FineTuneStatus, LlamaFineTune
from llamaops.api.meta import API_VERSION, GROUP, VERSION
from llamaops.api.serve import LlamaServe, LlamaServeSpec, LlamaServeStatus

__all__ = [
    "API_VERSION", "GROUP", "VERSION",
    "FineTuneSpec", "FineTuneStatus", "LlamaFineTune",
    "LlamaServe", "LlamaServeSpec", "LlamaServeStatus",
]
