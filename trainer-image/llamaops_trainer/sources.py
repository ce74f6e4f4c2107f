"""Fetching the dataset's records from a PVC, an HTTP(S) URL, S3 or the Hugging Face Hub.

Every source ends as a list of Records (a JSON object plus where it came from,
for error messages). Problems with the data itself are BadData, a source that
cannot exist (a missing path, a 404) is BadConfig naming the spec field, and
network trouble (and S3 credentials the store refuses) is Retryable.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaops.api.contract import ENV_HTTP_AUTHORIZATION, pvc_path, redact_url
from llamaops.api.finetune import DatasetSpec

from llamaops_trainer import s3
from llamaops_trainer.distributed import WorldInfo, local_main_first
from llamaops_trainer.errors import BadConfig, BadData, Retryable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    where: str  # "file.jsonl:12" or "dataset[12]"
    value: Any


def cache_dir() -> Path:
    """Downloads land here; ranks on one node share it (local rank 0 fetches first)."""
    root = Path(os.environ.get("LLAMAOPS_DATA_CACHE", Path(tempfile.gettempdir()) / "llamaops-data"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def read_jsonl(path: Path, label: str | None = None) -> Iterator[Record]:
    label = label or path.name
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise BadData(f"{label}:{lineno}: not UTF-8 text") from None
                if not line:
                    continue
                try:
                    yield Record(f"{label}:{lineno}", json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BadData(f"{label}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except IsADirectoryError:
        raise BadData(f"{label}: is a directory") from None


def jsonl_files(path: Path, field: str) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise BadData(f"{path}: directory holds no *.jsonl file")
        return files
    raise BadConfig(field, f"{path} does not exist (is the claim populated?)")


def _records_from_files(files: Iterable[Path], root: Path | None = None) -> list[Record]:
    records: list[Record] = []
    for f in files:
        label = str(f.relative_to(root)) if root and f != root and root in f.parents else f.name
        records.extend(read_jsonl(f, label))
    return records


def _fetch_http(url: str, sha256: str | None, dest: Path) -> Path:
    """Downloads once; every message names the URL redacted (no credentials reach logs or the run's status)."""
    if dest.is_file():
        return dest
    tmp = dest.with_name(dest.name + f".{os.getpid()}.part")
    digest = hashlib.sha256()
    shown = redact_url(url)
    headers = {"User-Agent": "llamaops-trainer"}
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None:  # user:password@ as Basic authentication (urllib would take it for the host)
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    if os.environ.get(ENV_HTTP_AUTHORIZATION):
        headers["Authorization"] = os.environ[ENV_HTTP_AUTHORIZATION]  # spec.dataset.http.authSecretRef
    try:
        req = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as resp, tmp.open("wb") as f:  # noqa: S310 (spec URL)
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except urllib.error.HTTPError as exc:
        tmp.unlink(missing_ok=True)
        if exc.code in (400, 401, 403, 404, 410):
            raise BadConfig("spec.dataset.http.url", f"HTTP {exc.code} {exc.reason} for {shown}") from None
        raise Retryable(f"downloading {shown}: HTTP {exc.code} {exc.reason}") from None
    except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
        tmp.unlink(missing_ok=True)
        raise Retryable(f"downloading {shown}: {str(exc).replace(url, shown)}") from None
    if sha256 and digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise BadData(f"{shown}: SHA-256 is {digest.hexdigest()}, spec.dataset.http.sha256 expects {sha256}")
    tmp.replace(dest)
    return dest


def _fetch_s3(loc: Any, dest_dir: Path) -> list[Path]:
    """s3://bucket/key: that object; s3://bucket/prefix/ (or the bucket): every *.jsonl under it."""
    field = "spec.dataset.s3.uri"
    bucket, key = s3.parse_uri(loc.uri)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with s3.errors(field, loc.uri):
        client = s3.client(loc.endpoint, loc.region)
        if key and not key.endswith("/"):
            dest = dest_dir / Path(key).name
            if dest.is_file():
                return [dest]
            try:
                return [s3.download_file(client, bucket, key, dest)]
            except Exception as exc:
                if s3.is_not_found(exc) and s3.list_keys(client, bucket, key + "/", ".jsonl"):
                    raise BadConfig(field, f"{loc.uri} is a prefix, not an object: end the URI with '/' "
                                           "to read every *.jsonl under it") from None
                raise
        paths = s3.download_prefix(client, bucket, key, dest_dir, ".jsonl")
    if not paths:
        raise BadData(f"{loc.uri}: no *.jsonl object under this prefix")
    return paths


def _records_from_hub(ds: Any) -> list[Record]:
    import datasets
    from huggingface_hub import errors as hub_errors

    try:
        data = datasets.load_dataset(ds.name, ds.config, split=ds.split, revision=ds.revision,
                                     token=os.environ.get("HF_TOKEN") or None)
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError, hub_errors.RevisionNotFoundError,
            datasets.exceptions.DatasetNotFoundError) as exc:
        raise BadConfig("spec.dataset.huggingFace.name", f"{ds.name}: {type(exc).__name__}") from None
    except ValueError as exc:  # unknown split or config
        raise BadConfig("spec.dataset.huggingFace", " ".join(str(exc).split())[:300]) from None
    return [Record(f"{ds.name}[{i}]", row) for i, row in enumerate(data)]


def load_records(spec: DatasetSpec, world: WorldInfo) -> list[Record]:
    """All records of the dataset, in source order (files sorted by name)."""
    if spec.pvc is not None:
        root = Path(pvc_path(spec.pvc.claim_name, spec.pvc.path))
        files = jsonl_files(root, "spec.dataset.pvc.path")
        records = _records_from_files(files, root)
        label = f"pvc://{spec.pvc.claim_name}/{spec.pvc.path}"
    elif spec.http is not None:
        # Keyed by URL and checksum: a changed sha256 in the spec never reuses an older download.
        name = hashlib.sha256(f"{spec.http.url} {spec.http.sha256}".encode()).hexdigest()[:16] + ".jsonl"
        with local_main_first(world):
            path = _fetch_http(spec.http.url, spec.http.sha256, cache_dir() / name)
        label = redact_url(spec.http.url)
        records = list(read_jsonl(path, label.rsplit("/", 1)[-1] or label))
    elif spec.s3 is not None:
        sub = cache_dir() / ("s3-" + hashlib.sha256(spec.s3.uri.encode()).hexdigest()[:16])
        with local_main_first(world):
            files = _fetch_s3(spec.s3, sub)
        records = _records_from_files(files)
        label = spec.s3.uri
    elif spec.hugging_face is not None:
        with local_main_first(world):
            records = _records_from_hub(spec.hugging_face)
        label = spec.hugging_face.name
    else:  # the API's CEL rule makes this unreachable
        raise BadConfig("spec.dataset", "set exactly one dataset source: pvc, http, s3 or huggingFace")
    if not records:
        raise BadData(f"dataset {label} is empty: no JSON line found")
    log.info("read %d records from %s", len(records), label)
    return records
