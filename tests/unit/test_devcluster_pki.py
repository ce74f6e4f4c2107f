from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from llamaops_dev.devcluster import pki


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def subject(cert: x509.Certificate, oid) -> list[str]:
    return [a.value for a in cert.subject.get_attributes_for_oid(oid)]


def test_generated_pki(tmp_path):
    paths = pki.generate(tmp_path)
    assert paths.complete()
    ca = load(paths.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    server = load(paths.apiserver_cert)
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "kubernetes.default.svc"} <= set(san.get_values_for_type(x509.DNSName))
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("10.96.0.1") in ips
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    expected = {
        "admin": (["llamaops-admin"], ["system:masters"]),
        "kube-controller-manager": (["system:kube-controller-manager"], []),
        "kube-scheduler": (["system:kube-scheduler"], []),
        "kwok": (["kwok-controller"], []),
    }
    for name, (cn, orgs) in expected.items():
        cert = load(paths.client_cert(name))
        cert.verify_directly_issued_by(ca)
        assert subject(cert, NameOID.COMMON_NAME) == cn
        assert subject(cert, NameOID.ORGANIZATION_NAME) == orgs
        assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    sa_key = serialization.load_pem_private_key(paths.sa_key.read_bytes(), password=None)
    assert isinstance(sa_key, rsa.RSAPrivateKey)
    sa_pub = serialization.load_pem_public_key(paths.sa_pub.read_bytes())
    assert sa_pub.public_numbers() == sa_key.public_key().public_numbers()
    assert paths.ca_key.stat().st_mode & 0o077 == 0


def test_local_serving_and_client_certs(tmp_path):
    paths = pki.generate(tmp_path / "pki")
    pki.issue_client_cert(paths, "kueue", pki.ClientIdentity("llamaops-kueue"))
    client = load(paths.client_cert("kueue"))
    client.verify_directly_issued_by(load(paths.ca_cert))
    assert subject(client, NameOID.COMMON_NAME) == ["llamaops-kueue"]
    assert ExtendedKeyUsageOID.CLIENT_AUTH in client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    pki.issue_serving_cert(paths, "llamaops-kueue", tmp_path / "certs" / "tls.crt", tmp_path / "certs" / "tls.key")
    cert = load(tmp_path / "certs" / "tls.crt")
    cert.verify_directly_issued_by(load(paths.ca_cert))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert (tmp_path / "certs" / "tls.key").stat().st_mode & 0o077 == 0
