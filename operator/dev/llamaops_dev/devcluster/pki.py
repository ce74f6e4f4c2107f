"""The dev cluster's certificates: one CA, the API server's serving certificate,
client certificates for the admin and each component, and the service-account
signing key pair.

ECDSA P-256 keys keep generation to milliseconds; the service-account key is
RSA, the algorithm every token consumer supports.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
APISERVER_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
APISERVER_IPS = ("127.0.0.1", "::1", KUBERNETES_SERVICE_IP)


@dataclass(frozen=True)
class ClientIdentity:
    common_name: str
    organizations: tuple[str, ...] = ()


# The identities the components authenticate as. The API server's RBAC
# bootstrap policy already grants system:kube-controller-manager and
# system:kube-scheduler what they need; system:masters is cluster-admin;
# kwok gets a ClusterRole of its own (see cluster.py). Optional components
# (Kueue) get theirs from `issue_client_cert` when they are started.
CLIENTS: dict[str, ClientIdentity] = {
    "admin": ClientIdentity("llamaops-admin", ("system:masters",)),
    "kube-controller-manager": ClientIdentity("system:kube-controller-manager"),
    "kube-scheduler": ClientIdentity("system:kube-scheduler"),
    "kwok": ClientIdentity("kwok-controller"),
}
# Names and addresses of the serving certificates of local components (Kueue's
# webhook and metrics servers), which listen on the loopback address only.
LOCAL_SERVING_DNS_NAMES = ("localhost",)
LOCAL_SERVING_IPS = ("127.0.0.1", "::1")


class PKIPaths:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def apiserver_cert(self) -> Path:
        return self.root / "apiserver.crt"

    @property
    def apiserver_key(self) -> Path:
        return self.root / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.root / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "sa.pub"

    def client_cert(self, name: str) -> Path:
        return self.root / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.root / f"{name}.key"

    def complete(self) -> bool:
        files = [self.ca_cert, self.ca_key, self.apiserver_cert, self.apiserver_key, self.sa_key, self.sa_pub]
        for name in CLIENTS:
            files += [self.client_cert(name), self.client_key(name)]
        return all(f.exists() for f in files)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, orgs: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _key_usage(*, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not cert_sign,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
    days: int = 365,
) -> x509.Certificate:
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _load_ca(paths: PKIPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{paths.ca_key} is not an EC key")
    return ca_cert, ca_key


def issue_client_cert(paths: PKIPaths, name: str, ident: ClientIdentity) -> None:
    """A client certificate for `ident`, at `paths.client_cert(name)`, signed by the cluster CA."""
    ca_cert, ca_key = _load_ca(paths)
    key = _ec_key()
    cert = _issue(ca_cert, ca_key, _name(ident.common_name, ident.organizations), key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(paths.client_key(name), _key_pem(key), private=True)
    _write(paths.client_cert(name), _cert_pem(cert))


def issue_serving_cert(paths: PKIPaths, common_name: str, cert_file: Path, key_file: Path) -> None:
    """A serving certificate for a component on the loopback address, signed by the cluster CA."""
    ca_cert, ca_key = _load_ca(paths)
    key = _ec_key()
    san = x509.SubjectAlternativeName(
        [x509.DNSName(n) for n in LOCAL_SERVING_DNS_NAMES] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOCAL_SERVING_IPS]
    )
    cert = _issue(ca_cert, ca_key, _name(common_name), key, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san)
    _write(key_file, _key_pem(key), private=True)
    _write(cert_file, _cert_pem(cert))


def generate(root: Path) -> PKIPaths:
    """Write a fresh PKI into `root` (replacing what is there) and return its paths."""
    paths = PKIPaths(root)
    now = _now()

    ca_key = _ec_key()
    ca_subject = _name("llamaops-dev-cluster-ca")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(paths.ca_key, _key_pem(ca_key), private=True)
    _write(paths.ca_cert, _cert_pem(ca_cert))

    server_key = _ec_key()
    san = x509.SubjectAlternativeName(
        [x509.DNSName(n) for n in APISERVER_DNS_NAMES] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in APISERVER_IPS]
    )
    server_cert = _issue(ca_cert, ca_key, _name("kube-apiserver"), server_key, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san)
    _write(paths.apiserver_key, _key_pem(server_key), private=True)
    _write(paths.apiserver_cert, _cert_pem(server_cert))

    for name, ident in CLIENTS.items():
        key = _ec_key()
        cert = _issue(ca_cert, ca_key, _name(ident.common_name, ident.organizations), key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        _write(paths.client_key(name), _key_pem(key), private=True)
        _write(paths.client_cert(name), _cert_pem(cert))

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write(paths.sa_key, _key_pem(sa_key), private=True)
    _write(
        paths.sa_pub,
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    return paths
