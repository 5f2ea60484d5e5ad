"""``fedagg certs``: a private CA and a server certificate for TLS (ECDSA P-256).

Two directories: the one the server and clients read (``deploy.certs``) gets ``ca.pem`` (for
the clients), ``server.pem`` and ``server.key`` (the server's), with the server's host names
and IP addresses as subject alternative names; the CA's private key ``ca.key`` (and a copy of
``ca.pem``) goes to a separate directory, by default ``<directory>-ca`` beside it (mode 0700),
never into the one the server reads: keep it offline. Keys are written with mode 0600, also
over existing files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedagg.deploy._files import private_dir, write_private
from fedagg.errors import ConfigError

__all__ = ["make_certs"]


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem)  # 0600, also over an existing file


def make_certs(
    directory: str | os.PathLike[str],
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    days: int = 825,
    ca_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Path]:
    """Create the CA and a server certificate valid for ``hosts``; returns the paths of
    ``ca.pem``, ``server.pem``, ``server.key`` (in ``directory``) and ``ca.key`` (in
    ``ca_dir``, by default ``<directory>-ca``; it may not be ``directory`` or inside it)."""
    d = Path(directory)
    served = d.resolve()
    if ca_dir is not None:
        ca_d = Path(ca_dir)
    elif d.name not in ("", ".", ".."):
        ca_d = d.with_name(f"{d.name}-ca")  # certs -> certs-ca, beside it
    else:
        ca_d = served.with_name(f"{served.name}-ca")
    if ca_d.resolve() == served or served in ca_d.resolve().parents:
        raise ConfigError(
            f"the CA directory {ca_d} must be outside {d}, the directory the server reads"
        )
    d.mkdir(parents=True, exist_ok=True)
    private_dir(ca_d)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedagg CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": d / "ca.pem",
        "ca_key": ca_d / "ca.key",
        "cert": d / "server.pem",
        "key": d / "server.key",
    }
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (ca_d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["ca_key"], ca_key)
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["key"], key)
    return paths
