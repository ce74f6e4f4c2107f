"""Self-contained kubeconfig files (certificates embedded) for the admin and the components."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import yaml

CLUSTER_NAME = "llamaops-dev"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def render(server: str, ca_cert: Path, client_cert: Path, client_key: Path, user: str) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME, "cluster": {"server": server, "certificate-authority-data": _b64(ca_cert)}}],
        "users": [{"name": user, "user": {"client-certificate-data": _b64(client_cert), "client-key-data": _b64(client_key)}}],
        "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user}}],
        "current-context": CLUSTER_NAME,
        "preferences": {},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def write(path: Path, server: str, ca_cert: Path, client_cert: Path, client_key: Path, user: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(render(server, ca_cert, client_cert, client_key, user))
    tmp.replace(path)
    return path
