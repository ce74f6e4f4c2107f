"""Reading manifests the way kubectl does.

PyYAML follows YAML 1.1, where `1e-5` (the seed's learning_rate) is a string;
Kubernetes' YAML reader, like YAML 1.2, reads it as a number. This loader
resolves such floats as kubectl would, so a recipe means the same to
`llamaops validate` as to the API server.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_all(text: str) -> list[dict[str, Any]]:
    """Every non-empty document of a multi-document YAML text."""
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc]


def load_file(path: str | Path) -> list[dict[str, Any]]:
    return load_all(Path(path).read_text())
