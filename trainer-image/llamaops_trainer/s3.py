"""S3 for datasets and adapter uploads, on boto3: AWS and S3-compatible stores (MinIO, Ceph).

Credentials come from boto3's default chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
(the operator fills them from the location's credentialsSecret), else the pod's
identity (a web identity token for IRSA, the container credentials endpoint for
EKS Pod Identity, instance metadata). Without any, requests go unsigned, which
only public buckets answer.

Failures become the trainer's errors through `errors(field, uri)`: a missing
bucket or object (or any other request the store rejects for good) is BadConfig
naming the spec field, refused credentials and network or server trouble are
Retryable. Messages carry the S3 error code and message, never a credential.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ParamValidationError

from llamaops_trainer.errors import BadConfig, Retryable

log = logging.getLogger(__name__)

# Error codes that mean the object or bucket is not there. HEAD requests (the
# first call of a download) carry no body, so their code is the HTTP status.
NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
# The store refused who we are: a rotated or not yet propagated Secret, an expired
# web identity token, clock skew. A restart rereads them, so these are Retryable.
AUTH = frozenset({
    "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "RequestTimeTooSkewed", "AllAccessDisabled", "AccountProblem",
})
# 4xx codes worth retrying (throttling, timeouts); every other 4xx is BadConfig.
TRANSIENT = frozenset({"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
                       "RequestLimitExceeded", "408", "429"})


def parse_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def directory(uri: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, "prefix/"): the key prefix of the files under it ("" at the bucket's root)."""
    bucket, prefix = parse_uri(uri)
    return bucket, prefix.rstrip("/") + "/" if prefix.strip("/") else ""


def client(endpoint: str | None = None, region: str | None = None) -> Any:
    """An S3 client for a location's endpoint and region (unset: AWS, and the region of the environment).

    An endpoint means an S3-compatible store: path-style addressing (no bucket DNS names),
    and checksums only where the API requires them, as not every store implements the
    CRC checksums botocore adds by default.
    """
    session = boto3.session.Session()
    # Attempts per request: AWS_MAX_ATTEMPTS, else the standard mode's 3.
    options: dict[str, Any] = {"connect_timeout": 10, "read_timeout": 60, "retries": {"mode": "standard"}}
    if endpoint:
        options |= {"s3": {"addressing_style": "path"}, "request_checksum_calculation": "when_required",
                    "response_checksum_validation": "when_required"}
    if session.get_credentials() is None:
        log.info("no AWS credentials in the environment or the pod's identity: S3 requests go unsigned")
        options["signature_version"] = UNSIGNED
    return session.client("s3", endpoint_url=endpoint or None, region_name=region or None, config=Config(**options))


def _code(exc: ClientError) -> tuple[str, str, int]:
    err = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    code = str(err.get("Code") or status or "Unknown")
    message = " ".join(str(err.get("Message") or "").split())[:300]
    return code, message, int(status)


def is_not_found(exc: BaseException) -> bool:
    """True for a ClientError saying the bucket or object does not exist."""
    if not isinstance(exc, ClientError):
        return False
    code, _, status = _code(exc)
    return code in NOT_FOUND or status == 404


def _translate(exc: Exception, field: str, uri: str) -> Exception:
    if isinstance(exc, Boto3Error):  # upload_file wraps the ClientError; a download can run out of retries
        cause = getattr(exc, "last_exception", None) or exc.__context__
        if isinstance(cause, (ClientError, BotoCoreError)):
            return _translate(cause, field, uri)
        return Retryable(f"S3 {uri}: {exc}")
    if isinstance(exc, ClientError):
        code, message, status = _code(exc)
        what = f"{uri}: {code}" + (f" ({message})" if message else "")
        if is_not_found(exc):
            # HEAD (a download's first request) answers a bare 404: say what it means.
            return BadConfig(field, what if message else f"{uri}: no such bucket or object (HTTP 404)")
        if code in AUTH or status in (401, 403):
            return Retryable(f"S3 refused the credentials for {what}; check the credentialsSecret "
                             "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the pod's identity")
        if 400 <= status < 500 and code not in TRANSIENT:
            return BadConfig(field, what)
        return Retryable(f"S3 {what}")
    if isinstance(exc, ParamValidationError):
        return BadConfig(field, f"{uri}: {' '.join(str(exc).split())}")
    if isinstance(exc, NoCredentialsError):  # a credential provider failed half way
        return Retryable(f"S3 {uri}: no usable AWS credentials")
    # Connection refused, DNS, timeouts, TLS: botocore has retried already.
    return Retryable(f"S3 {uri}: {exc}")


@contextmanager
def errors(field: str, uri: str) -> Iterator[None]:
    """Turns boto3's exceptions into BadConfig(field) or Retryable, naming the URI."""
    try:
        yield
    except (Boto3Error, BotoCoreError, ClientError) as exc:
        raise _translate(exc, field, uri) from None


def download_file(conn: Any, bucket: str, key: str, dest: Path) -> Path:
    """One object to dest; boto3 writes a temporary file and renames it, so a partial download never looks whole."""
    conn.download_file(bucket, key, str(dest))
    return dest


def list_keys(conn: Any, bucket: str, prefix: str, suffix: str = "") -> list[str]:
    """The keys under prefix ending with suffix, sorted. A missing bucket raises NoSuchBucket."""
    keys: list[str] = []
    for page in conn.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", ()) if o["Key"].endswith(suffix)]
    return sorted(keys)


def download_prefix(conn: Any, bucket: str, prefix: str, dest_dir: Path, suffix: str = "") -> list[Path]:
    """Every object under prefix ending with suffix, in key order, as <index>-<name> in dest_dir.

    Files already there (an earlier attempt on this node) are reused.
    """
    paths = []
    for i, key in enumerate(list_keys(conn, bucket, prefix, suffix)):
        dest = dest_dir / f"{i:05d}-{Path(key).name}"
        paths.append(dest if dest.is_file() else download_file(conn, bucket, key, dest))
    return paths


def upload_dir(conn: Any, src: Path, bucket: str, prefix: str, last: str | None = None,
               exclude: frozenset[str] = frozenset()) -> list[str]:
    """Every file under src but those named in exclude to s3://bucket/<prefix><relative path>; the file named
    `last` goes last.

    Returns the keys written, in order.
    """
    files = sorted((p for p in src.rglob("*") if p.is_file() and p.name not in exclude),
                   key=lambda p: (p.name == last, str(p)))
    keys = []
    for f in files:
        key = prefix + f.relative_to(src).as_posix()
        conn.upload_file(str(f), bucket, key)
        keys.append(key)
    return keys


def read_text(conn: Any, bucket: str, key: str) -> str | None:
    """A small object's text, or None when there is no such object."""
    try:
        return conn.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except ClientError as exc:
        if is_not_found(exc) and _code(exc)[0] != "NoSuchBucket":
            return None
        raise


def delete_keys(conn: Any, bucket: str, keys: list[str]) -> None:
    """Deletes the keys, 1000 a request (DeleteObjects' limit). A key already gone is no error; any other is raised."""
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i:i + 1000]]
        failed = conn.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}).get("Errors") or []
        if failed:  # reported in a 200 answer, one entry a key
            raise ClientError({"Error": {"Code": failed[0].get("Code"), "Message": failed[0].get("Message")}},
                              "DeleteObjects")
