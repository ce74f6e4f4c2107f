"""Dataset sources other than a PVC: HTTP(S) with a checksum, S3 (SigV4), a datasets-loadable location."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from llamaops.api.finetune import DatasetSpec
from llamaops_trainer import s3, sources
from llamaops_trainer.distributed import WorldInfo
from llamaops_trainer.errors import BadConfig, BadData

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
KEY, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_sigv4_matches_the_aws_documented_examples() -> None:
    """The GetObject and ListObjects examples of the S3 SigV4 documentation."""
    creds = s3.Credentials(KEY, SECRET)
    when = dt.datetime(2013, 5, 24, tzinfo=dt.UTC)
    get = s3.sign("GET", "https://examplebucket.s3.amazonaws.com/test.txt", {"Range": "bytes=0-9"},
                  s3.EMPTY_SHA256, creds, "us-east-1", when)
    assert get["Authorization"].endswith("SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
                                         "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
    listing = s3.sign("GET", "https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J", {},
                      s3.EMPTY_SHA256, creds, "us-east-1", when)
    assert listing["Authorization"].endswith(
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7")


class FakeS3(http.server.BaseHTTPRequestHandler):
    """Path-style S3 on loopback: ListObjectsV2 (two pages), GetObject, PutObject; checks every request is signed."""

    objects: dict[str, bytes] = {}
    seen: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        ok = auth.startswith(f"AWS4-HMAC-SHA256 Credential={KEY}/") and "x-amz-date" in auth
        if not ok:
            self.send_response(403)
            self.end_headers()
            self.wfile.write(b"<Error><Code>AccessDenied</Code></Error>")
        return ok

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        url = urllib.parse.urlsplit(self.path)
        bucket, _, key = url.path.lstrip("/").partition("/")
        query = dict(urllib.parse.parse_qsl(url.query))
        self.seen.append(f"GET {url.path}?{url.query}")
        if query.get("list-type") == "2":
            keys = sorted(k for k in self.objects if k.startswith(query.get("prefix", "")))
            page, more = (keys[1:], False) if query.get("continuation-token") == "t1" else (keys[:1], len(keys) > 1)
            ns = "http://s3.amazonaws.com/doc/2006-03-01/"
            body = f'<ListBucketResult xmlns="{ns}">' + "".join(
                f"<Contents><Key>{k}</Key></Contents>" for k in page)
            body += f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>"
            body += "<NextContinuationToken>t1</NextContinuationToken>" if more else ""
            payload = (body + "</ListBucketResult>").encode()
        elif urllib.parse.unquote(key) in self.objects:
            payload = self.objects[urllib.parse.unquote(key)]
        else:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"<Error><Code>NoSuchKey</Code></Error>")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_PUT(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.headers["x-amz-content-sha256"] == hashlib.sha256(body).hexdigest()
        self.objects[urllib.parse.unquote(urllib.parse.urlsplit(self.path).path.split("/", 2)[2])] = body
        self.send_response(200)
        self.end_headers()


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeS3)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _lines(*rows: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_s3_prefix_lists_pages_and_downloads(server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("LLAMAOPS_DATA_CACHE", str(tmp_path))
    FakeS3.objects = {"data/a.jsonl": _lines(ROW, ROW), "data/b.jsonl": _lines(ROW), "data/readme.txt": b"x"}
    FakeS3.seen = []
    spec = DatasetSpec.model_validate({"s3": {"uri": "s3://my-bucket/data/", "endpoint": server, "region": "eu-west-1"}})
    records = sources.load_records(spec, WorldInfo())
    assert len(records) == 3 and records[0].value == ROW
    assert any("continuation-token=t1" in s for s in FakeS3.seen)
    single = DatasetSpec.model_validate({"s3": {"uri": "s3://my-bucket/data/b.jsonl", "endpoint": server}})
    assert len(sources.load_records(single, WorldInfo())) == 1
    missing = DatasetSpec.model_validate({"s3": {"uri": "s3://my-bucket/data/nope.jsonl", "endpoint": server}})
    with pytest.raises(BadConfig, match=r"spec.dataset.s3.uri: HTTP 404: NoSuchKey"):
        sources.load_records(missing, WorldInfo())


def test_s3_without_credentials_is_refused(server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LLAMAOPS_DATA_CACHE", str(tmp_path))
    spec = DatasetSpec.model_validate({"s3": {"uri": "s3://my-bucket/x.jsonl", "endpoint": server}})
    with pytest.raises(BadConfig, match="HTTP 403: AccessDenied"):
        sources.load_records(spec, WorldInfo())


def test_s3_upload_puts_complete_last(server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from llamaops_trainer.export import upload_adapter

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    FakeS3.objects, FakeS3.seen = {}, []
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("COMPLETE", "adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_text(name)
    loc = DatasetSpec.model_validate({"s3": {"uri": "s3://out-bucket/runs/a b/", "endpoint": server}}).s3
    assert upload_adapter(adapter, loc) == "s3://out-bucket/runs/a b/adapter"
    assert list(FakeS3.objects)[-1] == "runs/a b/adapter/COMPLETE"
    assert FakeS3.objects["runs/a b/adapter/adapter_config.json"] == b"adapter_config.json"


class Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Files(*a, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_http_with_checksum(file_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url, root = file_server
    monkeypatch.setenv("LLAMAOPS_DATA_CACHE", str(tmp_path / "cache"))
    body = _lines(ROW, ROW)
    (root / "chat.jsonl").write_bytes(body)
    good = DatasetSpec.model_validate({"http": {"url": f"{url}/chat.jsonl", "sha256": hashlib.sha256(body).hexdigest()}})
    assert len(sources.load_records(good, WorldInfo())) == 2
    (root / "other.jsonl").write_bytes(body)
    bad = DatasetSpec.model_validate({"http": {"url": f"{url}/other.jsonl", "sha256": "0" * 64}})
    with pytest.raises(BadData, match="SHA-256 is"):
        sources.load_records(bad, WorldInfo())
    assert not list((tmp_path / "cache").glob("*.part")), "a failed download leaves nothing behind"
    missing = DatasetSpec.model_validate({"http": {"url": f"{url}/missing.jsonl"}})
    with pytest.raises(BadConfig, match="spec.dataset.http.url: HTTP 404"):
        sources.load_records(missing, WorldInfo())


def test_datasets_loader_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The huggingFace source goes through datasets.load_dataset (here a local directory: no network)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    local = tmp_path / "hfdata"
    local.mkdir()
    (local / "train.jsonl").write_bytes(_lines(ROW, ROW, ROW))
    spec = DatasetSpec.model_validate({"huggingFace": {"name": str(local), "split": "train"}})
    records = sources.load_records(spec, WorldInfo())
    assert len(records) == 3 and records[0].value["messages"] == ROW["messages"]
