"""SendGrid's Signed Event Webhook: ECDSA P-256 with SHA-256 over `timestamp + raw body`
(core.domain.email_events.signed_content), the signature base64 DER. The route keeps the provider's
verification key as SendGrid shows it: base64 of the DER SubjectPublicKeyInfo (a PEM block is
taken too). `sign` and the key helpers serve `mail-sim`, which signs its events the same way.

Outside core/domain because it needs the `cryptography` package (the domain imports only the
standard library and pydantic).
"""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from core.domain.email_events import signed_content

_ALGORITHM = ec.ECDSA(hashes.SHA256())


class BadKey(ValueError):
    """A verification or signing key that cannot be used (not P-256, not base64 DER or PEM)."""


@lru_cache(maxsize=64)
def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The P-256 public key in `text` (base64 DER, or a PEM block). Raises BadKey."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error) as e:
        raise BadKey(f"not a public key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BadKey("not an ECDSA P-256 public key")
    return key


def verify(public_key: str, timestamp: str, body: bytes, signature: str) -> bool:
    """Whether `signature` (base64 DER) signs `timestamp + body` under `public_key`. Never raises for
    a bad signature (False); raises BadKey for an unusable key (the route's configuration)."""
    key = load_public_key(public_key)
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
        key.verify(raw, signed_content(timestamp, body), _ALGORITHM)
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def sign(private_key: ec.EllipticCurvePrivateKey, timestamp: str, body: bytes) -> str:
    """The base64 DER signature of `timestamp + body`, as SendGrid sends it."""
    return base64.b64encode(private_key.sign(signed_content(timestamp, body), _ALGORITHM)).decode()


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM. Raises BadKey."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise BadKey(f"not a private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BadKey("not an ECDSA P-256 private key")
    return key


def public_key_text(key: ec.EllipticCurvePrivateKey) -> str:
    """The verification key of `key` as SendGrid shows one: base64 of the DER SubjectPublicKeyInfo."""
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()
