"""operator/Dockerfile, by structure: there is no Docker here, so the image is never built by these
tests. What they do check: multi-stage, a pinned python 3.11 slim base, only the `operator` extra,
every dependency pinned by operator/constraints.txt (in agreement with pyproject.toml), a numeric
non-root USER that is the chart's runAsUser, the entrypoint the chart relies on."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "operator" / "Dockerfile"
CONSTRAINTS = REPO / "operator" / "constraints.txt"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_multi_stage_on_a_pinned_python_311_slim_base() -> None:
    ins = instructions()
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", base), base
    froms = [a for w, a in ins if w == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    final = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    assert any(w == "COPY" and a.startswith("--from=build") for w, a in ins[final:])
    assert not any(w == "RUN" and "pip install" in a for w, a in ins[final:]), "install in the build stage only"


def test_only_the_operator_extra_with_every_dependency_pinned() -> None:
    runs = " ".join(a for w, a in instructions() if w == "RUN")
    installs = re.findall(r"pip install ([^&]+)", runs)
    assert installs and all("--constraint constraints.txt" in i for i in installs)
    assert '".[operator]"' in runs
    for extra in ("dev", "trainer", "cli"):
        assert f"[{extra}" not in runs and f",{extra}" not in runs, extra
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[A-Za-z0-9_.+-]+", version), line
            pins[name.lower().replace("_", "-")] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"] + project["optional-dependencies"]["operator"]:
        name, _, version = req.partition("==")
        assert version, f"pyproject.toml pins {req!r} loosely"
        assert pins.get(name.lower().replace("_", "-")) == version, f"constraints.txt disagrees on {req}"
    assert "torch" not in pins and "pytest" not in pins


def test_non_root_numeric_user_matching_the_chart_and_entrypoint() -> None:
    ins = instructions()
    users = [a for w, a in ins if w == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit())
    values = yaml.safe_load((REPO / "charts" / "llamaops" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid or uid)
    assert json.loads([a for w, a in ins if w == "ENTRYPOINT"][-1]) == ["llamaops", "operator"]
    exposed = {int(p) for w, a in ins if w == "EXPOSE" for p in a.split()}
    assert exposed == {values["livenessPort"], values["metrics"]["port"]}


def test_build_context_ignores_everything_but_what_the_image_needs() -> None:
    ignore = (REPO / "operator" / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("**")] == "**" and "!operator/llamaops" in ignore
    copied = [a.split()[:-1] for w, a in instructions() if w == "COPY" and not a.startswith("--from")]
    for sources in copied:
        for src in sources:
            assert f"!{src}" in ignore, f"{src} is copied but excluded from the build context"
