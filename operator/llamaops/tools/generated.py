"""One drift rule for every generated file: write what differs, or (check) list it and fail."""

from __future__ import annotations

import sys
from pathlib import Path


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
