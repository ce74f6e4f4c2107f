"""What the seed document tells us about Llama models and GPUs.

The model table follows the seed's version table (Llama 3: 8K context; 3.1,
3.2 and 3.3: 128K) with each size's architecture from its published config,
so the validator can check context lengths, tensor-parallel splits and
memory plans without downloading anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    params_b: float  # billions of parameters
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 128256
    tied_embeddings: bool = False  # lm_head shares the embedding matrix (Llama 3.2 1B and 3B)


@dataclass(frozen=True)
class CatalogModel:
    family: str  # "3", "3.1", "3.2", "3.3"
    size: str  # "8B"
    context: int
    arch: Architecture
    multimodal: bool = False

    @property
    def name(self) -> str:
        return f"Llama {self.family} {self.size}"


_ARCH = {
    "1B": Architecture(1.24, 2048, 16, 32, 8, 8192, tied_embeddings=True),
    "3B": Architecture(3.21, 3072, 28, 24, 8, 8192, tied_embeddings=True),
    "8B": Architecture(8.03, 4096, 32, 32, 8, 14336),
    "11B": Architecture(10.6, 4096, 40, 32, 8, 14336),  # 3.2 Vision: 8B text + cross-attention
    "70B": Architecture(70.6, 8192, 80, 64, 8, 28672),
    "90B": Architecture(88.6, 8192, 100, 64, 8, 28672),
    "405B": Architecture(405.9, 16384, 126, 128, 8, 53248),
}
_FAMILIES = {
    "3": (8192, ["8B", "70B"]),
    "3.1": (131072, ["8B", "70B", "405B"]),
    "3.2": (131072, ["1B", "3B", "11B", "90B"]),
    "3.3": (131072, ["70B"]),
}
CATALOG: dict[tuple[str, str], CatalogModel] = {
    (family, size): CatalogModel(family, size, context, _ARCH[size], multimodal=size in ("11B", "90B"))
    for family, (context, sizes) in _FAMILIES.items()
    for size in sizes
}

# meta-llama/Llama-3.1-8B-Instruct, meta-llama/Meta-Llama-3-70B, .../Llama-3.2-11B-Vision-Instruct, llama3.1:8b
_NAME = re.compile(r"(?:^|[/_-])(?:meta-)?llama[-_ ]?(3(?:\.\d)?)[-_:]?(\d+)b(?![a-z0-9])", re.IGNORECASE)


def lookup(base_model: str) -> CatalogModel | None:
    """The catalog entry a model id or path names, if it names a Llama 3.x model."""
    match = _NAME.search(base_model)
    if not match:
        return None
    return CATALOG.get((match.group(1), f"{match.group(2)}B"))


def nearest_sizes(base_model: str) -> list[str]:
    """For an unknown Llama 3.x size: the sizes its family does have."""
    match = _NAME.search(base_model)
    if not match or match.group(1) not in _FAMILIES:
        return []
    return _FAMILIES[match.group(1)][1]


# GPU memory (GB, as sold) by the nvidia.com/gpu.product label GPU feature discovery sets.
GPU_MEMORY_GB: dict[str, int] = {
    "NVIDIA-H200": 141,
    "NVIDIA-H100-80GB-HBM3": 80,
    "NVIDIA-H100-NVL": 94,
    "NVIDIA-H100-PCIe": 80,
    "NVIDIA-A100-SXM4-80GB": 80,
    "NVIDIA-A100-80GB-PCIe": 80,
    "NVIDIA-A100-SXM4-40GB": 40,
    "NVIDIA-A100-PCIE-40GB": 40,
    "NVIDIA-L40S": 48,
    "NVIDIA-L40": 48,
    "NVIDIA-A40": 48,
    "NVIDIA-RTX-A6000": 48,
    "NVIDIA-L4": 24,
    "NVIDIA-A10G": 24,
    "NVIDIA-A10": 24,
    "NVIDIA-GeForce-RTX-4090": 24,
    "Tesla-T4": 16,
    "Tesla-V100-SXM2-16GB": 16,
}
DEFAULT_GPU_MEMORY_GB = 80


def gpu_memory_gb(product: str | None) -> int | None:
    """Memory of a GPU product; matches the label exactly, then by a GB figure in its name."""
    if not product:
        return None
    if product in GPU_MEMORY_GB:
        return GPU_MEMORY_GB[product]
    for name, gb in GPU_MEMORY_GB.items():
        if name.lower() == product.lower():
            return gb
    sized = re.search(r"(\d{2,3})GB", product, re.IGNORECASE)
    return int(sized.group(1)) if sized else None
