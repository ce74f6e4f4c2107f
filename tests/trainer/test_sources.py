"""Dataset sources other than a PVC: HTTP(S) with a checksum, S3 (a real MinIO), a datasets-loadable location."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from llamaops.api.contract import EXIT_BAD_CONFIG, EXIT_RETRYABLE
from llamaops.api.finetune import DatasetSpec
from llamaops_trainer import sources
from llamaops_trainer.distributed import WorldInfo
from llamaops_trainer.errors import BadConfig, BadData, Retryable
from trainer_helpers import S3Server, aws_env, free_port

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _lines(*rows: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _s3_spec(server: S3Server, key: str, **extra: str) -> DatasetSpec:
    return DatasetSpec.model_validate({"s3": {"uri": f"s3://{server.bucket}/{key}", "endpoint": server.endpoint,
                                              **extra}})


@pytest.fixture
def s3_data(s3_env: S3Server) -> S3Server:
    """Under data/: two JSONL files (2 and 1 records) and a file the prefix source ignores."""
    client = s3_env.client()
    for key, body in {"data/a.jsonl": _lines(ROW, ROW), "data/b.jsonl": _lines(ROW), "data/readme.txt": b"x"}.items():
        client.put_object(Bucket=s3_env.bucket, Key=key, Body=body)
    return s3_env


def test_s3_object(s3_data: S3Server) -> None:
    records = sources.load_records(_s3_spec(s3_data, "data/a.jsonl", region="eu-west-1"), WorldInfo())
    assert [r.where for r in records] == ["a.jsonl:1", "a.jsonl:2"] and records[0].value == ROW


def test_s3_prefix_reads_every_jsonl_in_key_order(s3_data: S3Server) -> None:
    records = sources.load_records(_s3_spec(s3_data, "data/"), WorldInfo())
    assert [r.where for r in records] == ["00000-a.jsonl:1", "00000-a.jsonl:2", "00001-b.jsonl:1"]
    with pytest.raises(BadData, match="no \\*.jsonl object under this prefix"):
        sources.load_records(_s3_spec(s3_data, "nothing-here/"), WorldInfo())


def test_s3_missing_object_or_bucket_is_bad_config(s3_data: S3Server) -> None:
    with pytest.raises(BadConfig, match=r"spec.dataset.s3.uri: s3://.*/data/nope.jsonl: (NoSuchKey|no such bucket)") as e:
        sources.load_records(_s3_spec(s3_data, "data/nope.jsonl"), WorldInfo())
    assert e.value.field == "spec.dataset.s3.uri" and e.value.exit_code == EXIT_BAD_CONFIG
    missing_bucket = DatasetSpec.model_validate({"s3": {"uri": "s3://no-such-bucket/data/", "endpoint": s3_data.endpoint}})
    with pytest.raises(BadConfig, match="spec.dataset.s3.uri: s3://no-such-bucket/data/: NoSuchBucket"):
        sources.load_records(missing_bucket, WorldInfo())
    # A prefix written without its trailing slash: the message says what to change.
    with pytest.raises(BadConfig, match="is a prefix, not an object: end the URI with '/'"):
        sources.load_records(_s3_spec(s3_data, "data"), WorldInfo())


def test_s3_refused_credentials_are_retryable(s3_data: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "wrong-" + s3_data.secret_key
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(Retryable, match="S3 refused the credentials for s3://.*: SignatureDoesNotMatch") as e:
        sources.load_records(_s3_spec(s3_data, "data/a.jsonl"), WorldInfo())
    assert e.value.exit_code == EXIT_RETRYABLE
    assert wrong not in str(e.value) and s3_data.secret_key not in str(e.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(Retryable, match="S3 refused the credentials for s3://.*: InvalidAccessKeyId"):
        sources.load_records(_s3_spec(s3_data, "data/"), WorldInfo())
    # No credentials anywhere: unsigned requests, which a private bucket refuses.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(Retryable, match="S3 refused the credentials for s3://.*: AccessDenied"):
        sources.load_records(_s3_spec(s3_data, "data/a.jsonl"), WorldInfo())


def test_s3_unreachable_endpoint_is_retryable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    aws_env(monkeypatch, "AKIAEXAMPLE", "not-a-secret")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("LLAMAOPS_DATA_CACHE", str(tmp_path))
    spec = DatasetSpec.model_validate({"s3": {"uri": "s3://bucket/x.jsonl", "endpoint": f"http://127.0.0.1:{free_port()}"}})
    with pytest.raises(Retryable, match="S3 s3://bucket/x.jsonl: Could not connect to the endpoint URL"):
        sources.load_records(spec, WorldInfo())


class Files(http.server.SimpleHTTPRequestHandler):
    """Static files; those under /private/ only with the right Authorization header."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.startswith("/private/") and self.headers.get("Authorization") != "Bearer s3cret":
            self.send_error(401, "Unauthorized")
            return
        super().do_GET()


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


def test_http_credentials_come_from_a_secret_and_are_never_printed(
        file_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Defect 6: a URL with user:password@ or a signed query reached logs, conditions and Events. Now they are
    redacted wherever printed, and spec.dataset.http.authSecretRef sends an Authorization header instead."""
    url, root = file_server
    monkeypatch.setenv("LLAMAOPS_DATA_CACHE", str(tmp_path / "cache"))
    (root / "private").mkdir()
    (root / "private" / "chat.jsonl").write_bytes(_lines(ROW))
    private = DatasetSpec.model_validate({"http": {"url": f"{url}/private/chat.jsonl",
                                                    "authSecretRef": {"name": "dl", "key": "authorization"}}})
    with pytest.raises(BadConfig, match="HTTP 401"):
        sources.load_records(private, WorldInfo())
    monkeypatch.setenv("LLAMAOPS_HTTP_AUTHORIZATION", "Bearer s3cret")  # the builder's env, from the Secret
    assert len(sources.load_records(private, WorldInfo())) == 1
    monkeypatch.delenv("LLAMAOPS_HTTP_AUTHORIZATION")
    host = url.split("//")[1]
    basic = DatasetSpec.model_validate({"http": {"url": f"http://alice:hunter2@{host}/chat.jsonl"}})
    (root / "chat.jsonl").write_bytes(_lines(ROW, ROW))
    assert len(sources.load_records(basic, WorldInfo())) == 2  # user:password@ is sent as Basic authentication
    leaky = DatasetSpec.model_validate({"http": {"url": f"http://alice:hunter2@{host}/gone.jsonl?sig=XYZ123"}})
    with pytest.raises(BadConfig) as failure:
        sources.load_records(leaky, WorldInfo())
    text = str(failure.value) + caplog.text
    assert f"http://***@{host}/gone.jsonl?***" in text
    assert "hunter2" not in text and "XYZ123" not in text and "alice" not in text
