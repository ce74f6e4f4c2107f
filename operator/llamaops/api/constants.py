"""Names the operator, the trainer, the CLI and the dev tooling share, each defined once here.

The API's group, version, kinds and plurals; the labels and annotations LlamaOps
puts on what it creates; the node labels and resources of GPUs; field managers.
"""

from __future__ import annotations

GROUP = "llamaops.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# The kinds and their plural resource names (the CRDs' spec.names.plural), as the API's URLs spell them.
KIND_FINETUNE = "LlamaFineTune"
KIND_SERVE = "LlamaServe"
FINETUNES = "llamafinetunes"
SERVES = "llamaserves"

# Labels and annotations of the objects LlamaOps creates (builders/naming.py composes them).
MANAGED_BY = "llamaops"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_FINETUNE = f"{GROUP}/finetune"
LABEL_SERVE = f"{GROUP}/serve"
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"
ANNOTATION_RUN_HASH = f"{GROUP}/run-hash"
ANNOTATION_PLACEMENT = f"{GROUP}/placement"  # on a Job: the placement it was made for (nodes, queue labels)
ANNOTATION_OWNER = f"{GROUP}/owner"
# On a Service whose pods run on the dev node: host:port on this machine that reaches it (its first port).
ANNOTATION_LOCAL_ENDPOINT = f"{GROUP}/local-endpoint"
# Components (LABEL_COMPONENT values) the handlers watch.
COMPONENT_TRAINER = "trainer"
COMPONENT_REPORT = "report"  # the ConfigMap a training pod reports its progress and adapter in
COMPONENT_SERVER = "server"

# GPUs: the device plugin's extended resource and GPU feature discovery's product label.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
HOSTNAME_LABEL = "kubernetes.io/hostname"

# Kueue admits a suspended Job that carries this label (its LocalQueue).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

# Demo mode: the dev node's label and taint key (llamaops_dev.devnode registers it; the operator tolerates it).
DEV_NODE_LABEL = f"{GROUP}/dev-node"

# Server-side field managers: the operator's writes, and the trainer's status.progress patches.
FIELD_MANAGER = "llamaops"
TRAINER_FIELD_MANAGER = "llamaops-trainer"
