"""Private keys: generation, description, strength rules and PEM encoding (pure, no files)."""

from __future__ import annotations

from typing import Final, Literal, TypeAlias, get_args

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certs.errors import CertsError

KeyType = Literal["p256", "p384", "rsa3072"]
"""Key types the helper generates; P-256 is the default (fast, small, universally supported)."""

KEY_TYPES: Final[tuple[KeyType, ...]] = get_args(KeyType)
DEFAULT_KEY_TYPE: Final[KeyType] = "p256"

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

MIN_RSA_BITS: Final = 2048
MIN_EC_BITS: Final = 256


def generate_key(key_type: KeyType = DEFAULT_KEY_TYPE) -> PrivateKey:
    """Generate a new private key of ``key_type``."""
    match key_type:
        case "p256":
            return ec.generate_private_key(ec.SECP256R1())
        case "p384":
            return ec.generate_private_key(ec.SECP384R1())
        case "rsa3072":
            return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise CertsError(  # pragma: no cover - Literal exhausts the cases
        f"unknown key type {key_type!r}", fix=f"use one of {', '.join(KEY_TYPES)}"
    )


def key_type_of(key: object) -> KeyType | None:
    """The :data:`KeyType` that generates keys like ``key``, or ``None`` if it is not one."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name == "secp256r1":
            return "p256"
        return "p384" if key.curve.name == "secp384r1" else None
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey) and key.key_size == 3072:
        return "rsa3072"
    return None


def describe_key(key: object) -> str:
    """A short human description such as ``EC P-256`` or ``RSA 2048``."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name} ({key.curve.key_size} bits)"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__


def weak_key_reason(key: object) -> str | None:
    """Why ``key`` is too weak (or of an unsupported kind) to use, or ``None`` when it is fine."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits is below the {MIN_RSA_BITS}-bit minimum"
        return None
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.key_size < MIN_EC_BITS:
            return (
                f"EC curve {key.curve.name} ({key.curve.key_size} bits) is below the "
                f"{MIN_EC_BITS}-bit minimum"
            )
        return None
    return f"{type(key).__name__} keys are not supported (use EC P-256/P-384 or RSA)"


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """The hash a CA with ``key`` signs with: matched to the curve's strength for EC keys."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def key_to_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: services start unattended; the file's mode 0600 protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes, *, source: str) -> PrivateKey:
    """Load an unencrypted PEM private key; ``source`` names it in errors."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertsError(
            f"{source} is not an unencrypted PEM private key ({exc})",
            fix="use the .key file written by `replikant certs` next to the certificate",
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertsError(
            f"{source} holds a {type(key).__name__}, which Replikant does not use",
            fix="issue a new certificate and key with `replikant certs issue`",
        )
    return key
