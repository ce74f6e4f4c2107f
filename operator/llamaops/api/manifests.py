"""Reading manifests the way kubectl does.

PyYAML follows YAML 1.1, where `1e-5` (the seed's learning_rate) is a string;
Kubernetes' YAML reader, like YAML 1.2, reads it as a number. This loader
resolves such floats as kubectl would, so a recipe means the same to
`llamaops validate` as to the API server.
"""

from __future__ import annotations

import re
import sys
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


def sync_generated(files: dict[Path, str], *, check: bool, root: Path, what: str, command: str) -> int:
    """Write generated files that differ (or, with `check`, list them and return 1): one drift rule for all."""
    stale: list[str] = []
    for path, text in files.items():
        if path.exists() and path.read_text() == text:
            continue
        if check:
            stale.append(str(path.relative_to(root)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(root)}")
    if stale:
        print(f"stale {what} (run `{command}`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0
