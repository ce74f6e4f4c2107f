"""trainer-image/Dockerfile copies, of the operator's package, exactly what the trainer imports (read from the
trainer's source, imports inside functions included), and its build context lets those paths through."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operator"
TRAINER = REPO / "trainer-image" / "llamaops_trainer"
DOCKERFILE = REPO / "trainer-image" / "Dockerfile"


def _module_file(module: str) -> Path | None:
    base = OPERATOR.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """The llamaops modules a file imports (`from llamaops.x import y` may name a module y too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "llamaops"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "llamaops":
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return out


def trainer_closure() -> set[Path]:
    """Every file of operator/llamaops the trainer needs: what it imports, their packages, and so on."""
    todo = set().union(*(_imports(p) for p in TRAINER.rglob("*.py")))
    files: set[Path] = set()
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # a module's packages run their __init__ first
            path = _module_file(".".join(parts[:i]))
            if path is not None and path not in files:
                files.add(path)
                todo |= _imports(path)
    return files


def copied_sources() -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0].upper() == "COPY" and not words[1].startswith("--from"):
            out += words[1:-1]
    return out


def test_the_image_copies_exactly_the_operator_modules_the_trainer_imports() -> None:
    needed = trainer_closure()
    assert OPERATOR / "llamaops" / "api" / "contract.py" in needed  # the closure reads real imports
    copied = [REPO / src for src in copied_sources() if src.startswith("operator/")]
    for path in needed:
        assert any(path == c or c in path.parents for c in copied), f"{path.relative_to(REPO)} is imported but not copied"
    for c in copied:
        assert any(path == c or c in path.parents for path in needed), f"{c.relative_to(REPO)} is copied but unused"
    assert OPERATOR / "llamaops" not in copied, "the whole operator package"


def test_build_context_lets_the_copied_paths_through() -> None:
    ignore = (REPO / "trainer-image" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignore
    for src in copied_sources():
        assert f"!{src}" in ignore, f"{src} is copied but excluded from the build context"
