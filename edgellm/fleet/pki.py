# SPDX-License-Identifier: MIT
"""The fleet's certificates: EC P-256 keys, the CAs, device/hub/server certificates and the CRL.

The hub keeps two CAs (docs/fleet.md): a *device CA* that issues only client certificates
(each device's, CN = its device id, and the hub service's, CN = ``hub``) and that the broker
trusts for client authentication, and a *server CA* that issues only the broker's server
certificate and that devices pin. Keeping them apart means no server certificate can log in
as a device and no device certificate can impersonate the broker.

Public API:

- ``new_key()``; ``make_ca(cn, days)``; ``issue_client(ca_key, ca_cert, cn, days)``;
  ``issue_server(ca_key, ca_cert, host, days)``; ``make_crl(ca_key, ca_cert, revoked)``;
- ``write_key(path, key)`` (0600, atomic), ``write_pem(path, data)``, ``write_file(path, b)``,
  ``load_key(path)``, ``load_cert(path)``, ``load_crl(path)``;
- ``pem(cert)``, ``fingerprint(cert)``.

Nothing here checks device ids: home.py does (protocol.check_device_id) before it calls
``issue_client``, and a test calls ``issue_client`` directly to mint a hostile CN on purpose.

.. versionadded:: 0.1
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import PkiError

__all__ = [
    "CLOCK_SKEW", "PkiError", "fingerprint", "issue_client", "issue_server", "load_cert",
    "load_crl", "load_key", "make_ca", "make_crl", "new_key", "pem", "write_file", "write_key",
    "write_pem",
]

PathLike = Union[str, "os.PathLike[str]"]
CLOCK_SKEW = dt.timedelta(minutes=5)  # not_before is backdated: a device clock a little behind still works


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key (about 1 ms)."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             not_before: dt.datetime, days: float) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_before + CLOCK_SKEW
                                                          + dt.timedelta(days=days)))


def make_ca(cn: str, days: float = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (pathlen 0: it signs leaf certificates only) valid for days."""
    key = new_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (_builder(_name(cn), _name(cn), key, _now() - CLOCK_SKEW, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, days: float,
          eku: x509.ObjectIdentifier, not_before: dt.datetime | None,
          key: ec.EllipticCurvePrivateKey | None) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateBuilder]:
    key = key or new_key()
    b = (_builder(_name(cn), ca_cert.subject, key, not_before or _now() - CLOCK_SKEW, days)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=False, crl_sign=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                        critical=False))
    return key, b


def issue_client(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str,
                 days: float = 825, *, not_before: dt.datetime | None = None,
                 key: ec.EllipticCurvePrivateKey | None = None,
                 ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS client certificate (EKU clientAuth) with CN = cn, signed by the CA.

    The broker uses the CN as the MQTT username and client id, so cn must already be a
    checked device id (or "hub"). not_before lets a test make an already-expired certificate.
    """
    key, b = _leaf(ca_key, ca_cert, cn, days, ExtendedKeyUsageOID.CLIENT_AUTH, not_before, key)
    return key, b.sign(ca_key, hashes.SHA256())


def issue_server(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str,
                 days: float = 825, *, extra_hosts: Iterable[str] = (),
                 ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The broker's TLS server certificate (EKU serverAuth) with a SAN for host (IP or DNS).

    A wildcard address (0.0.0.0, ::) is not a name a client dials: pass the address devices
    use as extra_hosts. "localhost" and 127.0.0.1 are always added so the hub can connect
    locally.
    """
    sans: list[x509.GeneralName] = []
    seen: set[str] = set()
    for h in (host, *extra_hosts, "127.0.0.1", "localhost"):
        if not h or h in seen or h in ("0.0.0.0", "::"):
            continue
        seen.add(h)
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key, b = _leaf(ca_key, ca_cert, host, days, ExtendedKeyUsageOID.SERVER_AUTH, None, None)
    b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def make_crl(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
             revoked: Iterable[tuple[int, dt.datetime]], days: float = 3650) -> x509.CertificateRevocationList:
    """The CA's CRL listing (serial, revocation time) pairs; next_update is days ahead.

    An empty CRL is still written: mosquitto's crlfile must exist and OpenSSL then checks
    every client certificate against it (X509_V_FLAG_CRL_CHECK).
    """
    now = _now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
         .last_update(now - CLOCK_SKEW).next_update(now + dt.timedelta(days=days)))
    for serial, when in revoked:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(when).build())
    return b.sign(ca_key, hashes.SHA256())


# --------------------------------------------------------------------------------------
# Files: written atomically (temp file in the same folder, fsync, rename, fsync folder).

def write_file(path: PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write data to path atomically with the given mode (the folder is created if needed)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp makes it 0600 already; this sets the final mode first
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return p


def write_key(path: PathLike, key: ec.EllipticCurvePrivateKey) -> Path:
    """Write key as unencrypted PKCS#8 PEM, mode 0600, atomically."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    return write_file(path, data, 0o600)


def pem(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    """The PEM encoding of a certificate or CRL."""
    return obj.public_bytes(serialization.Encoding.PEM)


def write_pem(path: PathLike, data: bytes | x509.Certificate | x509.CertificateRevocationList,
              mode: int = 0o644) -> Path:
    """Write a certificate, CRL or PEM bytes atomically (mode 0644 by default)."""
    return write_file(path, data if isinstance(data, bytes) else pem(data), mode)


def load_key(path: PathLike) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted EC private key (PkiError names the file if it is not one)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not a readable private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: not an EC private key")
    return key


def load_cert(path: PathLike) -> x509.Certificate:
    """Read a PEM certificate (PkiError names the file if it is not one)."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path}: not a readable certificate ({exc})") from exc


def load_crl(path: PathLike) -> x509.CertificateRevocationList:
    """Read a PEM CRL (PkiError names the file if it is not one)."""
    try:
        return x509.load_pem_x509_crl(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path}: not a readable CRL ({exc})") from exc


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of the certificate, hex."""
    return cert.fingerprint(hashes.SHA256()).hex()
