"""Certificates and kubeconfigs for the local control plane, made with ``cryptography``.

One CA signs the API server's serving certificate and the admin client certificate
(group ``system:masters``); a separate RSA key pair signs service-account tokens, so
TokenRequest works exactly as on a real cluster. The same CA signs the node agent's
serving certificate and the client certificate the API server presents to it when it
proxies ``kubectl logs`` (as kubeadm does: the API server checks the node's certificate
with ``--kubelet-certificate-authority``, the node checks the API server's against the CA).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Pki:
    """Paths of every file the control plane and its clients need."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_public: Path
    sa_private: Path
    kubelet_serving_cert: Path  # the node agent's log endpoint (SAN 127.0.0.1)
    kubelet_serving_key: Path
    kubelet_client_cert: Path  # what kube-apiserver presents to the node agent
    kubelet_client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _cert(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    elif server:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        ).add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes"),
                    x509.DNSName("kubernetes.default"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                ]
            ),
            critical=False,
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def make_pki(directory: Path) -> Pki:
    """Write a fresh CA, serving and admin certificates and a service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagebatch-local-ca")])
    ca_cert = _cert(ca_name, ca_key.public_key(), ca_name, ca_key, ca=True)

    serving_key = _key()
    serving_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    serving_cert = _cert(serving_name, serving_key.public_key(), ca_name, ca_key, server=True)

    admin_key = _key()
    admin_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
            x509.NameAttribute(NameOID.COMMON_NAME, "imagebatch-admin"),
        ]
    )
    admin_cert = _cert(admin_name, admin_key.public_key(), ca_name, ca_key)

    kubelet_key = _key()
    kubelet_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imagebatch-node")])
    kubelet_cert = _cert(kubelet_name, kubelet_key.public_key(), ca_name, ca_key, server=True)

    to_kubelet_key = _key()
    to_kubelet_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
            x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver-kubelet-client"),
        ]
    )
    to_kubelet_cert = _cert(to_kubelet_name, to_kubelet_key.public_key(), ca_name, ca_key)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = serialization.Encoding.PEM
    return Pki(
        ca_cert=_write(directory / "ca.crt", ca_cert.public_bytes(pem)),
        ca_key=_write(directory / "ca.key", _pem_key(ca_key)),
        serving_cert=_write(directory / "apiserver.crt", serving_cert.public_bytes(pem)),
        serving_key=_write(directory / "apiserver.key", _pem_key(serving_key)),
        admin_cert=_write(directory / "admin.crt", admin_cert.public_bytes(pem)),
        admin_key=_write(directory / "admin.key", _pem_key(admin_key)),
        sa_public=_write(
            directory / "sa.pub",
            sa_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo),
        ),
        sa_private=_write(directory / "sa.key", _pem_key(sa_key)),
        kubelet_serving_cert=_write(directory / "kubelet.crt", kubelet_cert.public_bytes(pem)),
        kubelet_serving_key=_write(directory / "kubelet.key", _pem_key(kubelet_key)),
        kubelet_client_cert=_write(
            directory / "apiserver-kubelet-client.crt", to_kubelet_cert.public_bytes(pem)
        ),
        kubelet_client_key=_write(
            directory / "apiserver-kubelet-client.key", _pem_key(to_kubelet_key)
        ),
    )


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig(server: str, ca_cert: Path, user: dict[str, str], name: str = "imagebatch") -> str:
    """A kubeconfig with one cluster, one user and one current context."""
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": name,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_cert)},
            }
        ],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def admin_kubeconfig(server: str, pki: Pki) -> str:
    """The cluster admin: a client certificate in group system:masters."""
    return kubeconfig(
        server,
        pki.ca_cert,
        {
            "client-certificate-data": _b64(pki.admin_cert),
            "client-key-data": _b64(pki.admin_key),
        },
    )


def token_kubeconfig(server: str, ca_cert: Path, token: str, namespace: str) -> str:
    """What a pod's service account amounts to: a bearer token and its namespace."""
    text = kubeconfig(server, ca_cert, {"token": token})
    doc = yaml.safe_load(text)
    doc["contexts"][0]["context"]["namespace"] = namespace
    return yaml.safe_dump(doc, sort_keys=False)
