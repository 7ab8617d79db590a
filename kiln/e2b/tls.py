"""Domain mode's TLS: a local CA and a wildcard certificate for the E2B domain (`kiln e2b setup`).

The E2B SDKs build `https://api.<domain>` and `https://<port>-<id>.<domain>` themselves, so domain mode
needs a certificate for `*.<domain>` that clients trust. rustls refuses a wildcard right under a
one-label name, hence domains of two labels at least (`e2b.localhost`). Files, in data_dir/e2b-tls:
ca.pem (what clients trust), bundle.pem (the system's roots plus ca.pem, for clients whose CA file
replaces the system's), cert.pem + key.pem (the listener's), domain (what setup was run for).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from ..fileio import write_atomic

SYSTEM_ROOTS = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass
class TlsFiles:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def bundle(self) -> Path:
        return self.dir / "bundle.pem"

    @property
    def cert(self) -> Path:
        return self.dir / "cert.pem"

    @property
    def key(self) -> Path:
        return self.dir / "key.pem"

    @property
    def domain_file(self) -> Path:
        return self.dir / "domain"

    def domain(self) -> str:
        """The domain setup made the certificate for ('' if it was never run)."""
        try:
            return self.domain_file.read_text().strip() if self.cert.exists() and self.key.exists() else ""
        except OSError:
            return ""


def tls_files(data_dir: Path) -> TlsFiles:
    return TlsFiles(data_dir / "e2b-tls")


def setup(data_dir: Path, domain: str) -> TlsFiles:
    """Make (or remake) the CA and the wildcard certificate for `domain`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    files = tls_files(data_dir)
    files.dir.mkdir(parents=True, exist_ok=True)
    files.dir.chmod(0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kiln local CA for {domain}")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{domain}")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=397))  # what clients accept for a server certificate
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{domain}"), x509.DNSName(domain)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_pem = ca.public_bytes(pem)
    files.ca.write_bytes(ca_pem)
    roots = SYSTEM_ROOTS.read_bytes() if SYSTEM_ROOTS.exists() else b""
    files.bundle.write_bytes(roots + (b"\n" if roots and not roots.endswith(b"\n") else b"") + ca_pem)
    files.cert.write_bytes(leaf.public_bytes(pem) + ca_pem)
    write_atomic(files.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    files.domain_file.write_text(domain + "\n")
    return files
