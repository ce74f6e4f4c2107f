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


class _Dumper(yaml.SafeDumper):
    pass


# The same resolver on both sides: the dumper then quotes a string such as "1e5" that the loader (like kubectl)
# reads as a number, so a document written here reads back the same.
for _side in (_Loader, _Dumper):
    _side.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )


def load_all(text: str) -> list[dict[str, Any]]:
    """Every non-empty document of a multi-document YAML text."""
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc]


def load_file(path: str | Path) -> list[dict[str, Any]]:
    return load_all(Path(path).read_text())


def dump(doc: Any) -> str:
    """YAML that `load_all` reads back as exactly `doc` (strings that look like numbers stay strings)."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False)
