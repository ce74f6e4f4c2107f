"""A small S3 client (GetObject, ListObjectsV2, PutObject) signed with AWS Signature Version 4.

Why not boto3: every botocore release pins python-dateutil<3 while the
kubernetes client (status patching) needs >=3, so the two cannot share one
environment. S3 datasets and adapter uploads need three calls, which SigV4 over
urllib covers for AWS and S3-compatible stores (MinIO, Ceph) alike.

Credentials, in order: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY(/AWS_SESSION_TOKEN)
(the operator fills these from spec.dataset.s3.credentialsSecret), a web identity
token (IRSA: AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN), the container
credentials endpoint (EKS Pod Identity), else unsigned requests (public buckets).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    session_token: str | None = None


class S3Error(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def parse_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _quote(s: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(s, safe=safe)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret_key: str, date: str, region: str, service: str = "s3") -> bytes:
    k = _hmac(("AWS4" + secret_key).encode(), date)
    k = _hmac(k, region)
    k = _hmac(k, service)
    return _hmac(k, "aws4_request")


def sign(method: str, url: str, headers: dict[str, str], payload_hash: str, creds: Credentials,
         region: str, now: dt.datetime, service: str = "s3") -> dict[str, str]:
    """Headers for a SigV4-signed request: the given ones plus x-amz-date, x-amz-content-sha256, Authorization."""
    parts = urllib.parse.urlsplit(url)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    out = dict(headers)
    out["host"] = parts.netloc
    out["x-amz-date"] = amz_date
    out["x-amz-content-sha256"] = payload_hash
    if creds.session_token:
        out["x-amz-security-token"] = creds.session_token
    canon_headers = {k.lower().strip(): " ".join(str(v).split()) for k, v in out.items()}
    signed = ";".join(sorted(canon_headers))
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    canon_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query))
    canon_request = "\n".join([
        method,
        _quote(urllib.parse.unquote(parts.path) or "/", safe="/-_.~"),
        canon_query,
        "".join(f"{k}:{canon_headers[k]}\n" for k in sorted(canon_headers)),
        signed,
        payload_hash,
    ])
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canon_request.encode()).hexdigest()])
    signature = hmac.new(signing_key(creds.secret_key, date, region, service), to_sign.encode(),
                         hashlib.sha256).hexdigest()
    out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
                            f"SignedHeaders={signed}, Signature={signature}")
    del out["host"]  # urllib sets Host itself (same value)
    return out


def _env_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _web_identity_credentials() -> Credentials | None:
    token_file, role = os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"), os.environ.get("AWS_ROLE_ARN")
    if not (token_file and role):
        return None
    query = urllib.parse.urlencode({
        "Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15", "RoleArn": role,
        "RoleSessionName": os.environ.get("AWS_ROLE_SESSION_NAME", "llamaops-trainer"),
        "WebIdentityToken": Path(token_file).read_text().strip(),
    })
    region = _env_region()
    host = os.environ.get("AWS_STS_ENDPOINT") or f"https://sts.{region}.amazonaws.com"
    with urllib.request.urlopen(f"{host}/?{query}", timeout=30) as resp:  # noqa: S310 (https endpoint)
        root = ET.fromstring(resp.read())
    find = lambda tag: next(e.text for e in root.iter() if e.tag.endswith(tag))  # noqa: E731
    return Credentials(find("AccessKeyId"), find("SecretAccessKey"), find("SessionToken"))


def _container_credentials() -> Credentials | None:
    uri = os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if not uri:
        return None
    req = urllib.request.Request(uri)
    token = os.environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
    token_file = os.environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    if token_file:
        token = Path(token_file).read_text().strip()
    if token:
        req.add_header("Authorization", token)
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        doc = json.loads(resp.read())
    return Credentials(doc["AccessKeyId"], doc["SecretAccessKey"], doc.get("Token"))


def credentials_from_env() -> Credentials | None:
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return Credentials(key, secret, os.environ.get("AWS_SESSION_TOKEN") or None)
    return _web_identity_credentials() or _container_credentials()


class S3Client:
    def __init__(self, endpoint: str | None = None, region: str | None = None,
                 credentials: Credentials | None = None, timeout: float = 60) -> None:
        self.endpoint = endpoint.rstrip("/") if endpoint else None
        self.region = region or _env_region()
        self.credentials = credentials
        self.timeout = timeout

    def url(self, bucket: str, key: str = "", query: dict[str, str] | None = None) -> str:
        path = _quote(key, safe="/-_.~")
        if self.endpoint:  # S3-compatible stores: path-style addressing
            base = f"{self.endpoint}/{bucket}/{path}"
        else:
            base = f"https://{bucket}.s3.{self.region}.amazonaws.com/{path}"
        if query:
            base += "?" + "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
        return base

    def _request(self, method: str, url: str, data: bytes | None = None,
                 headers: dict[str, str] | None = None) -> urllib.request.Request:
        headers = dict(headers or {})
        if self.credentials is not None:
            payload_hash = hashlib.sha256(data).hexdigest() if data is not None else EMPTY_SHA256
            headers = sign(method, url, headers, payload_hash, self.credentials, self.region,
                           dt.datetime.now(dt.UTC))
        return urllib.request.Request(url, data=data, method=method, headers=headers)

    def _open(self, req: urllib.request.Request):
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 (configured endpoint)
        except urllib.error.HTTPError as exc:
            body = exc.read()[:2000].decode(errors="replace")
            code = next((e.text for e in _safe_xml(body).iter() if e.tag.endswith("Code")), None) if body else None
            raise S3Error(exc.code, f"{code or exc.reason} for {req.get_method()} {req.full_url}") from None

    def download(self, bucket: str, key: str, dest: Path) -> Path:
        """Streams an object to dest through a temporary file, so a partial download never looks whole."""
        tmp = dest.with_name(dest.name + ".part")
        with self._open(self._request("GET", self.url(bucket, key))) as resp, tmp.open("wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
        tmp.replace(dest)
        return dest

    def list(self, bucket: str, prefix: str) -> Iterator[str]:
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            with self._open(self._request("GET", self.url(bucket, "", query))) as resp:
                root = ET.fromstring(resp.read())
            for contents in root.iter(f"{_S3_NS}Contents"):
                yield contents.findtext(f"{_S3_NS}Key") or ""
            if root.findtext(f"{_S3_NS}IsTruncated") != "true":
                return
            token = root.findtext(f"{_S3_NS}NextContinuationToken")

    def upload(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        with self._open(self._request("PUT", self.url(bucket, key), data, {"content-type": content_type})):
            pass


def _safe_xml(text: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError:
        return ET.Element("none")
