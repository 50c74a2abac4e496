"""The Ed25519 key that signs fetch-log checkpoints: generate, load, and find the public half.

Private keys are PKCS#8 PEM (unencrypted: the gateway starts unattended; protect the file with its
mode, 0600, or a Kubernetes secret), public keys SubjectPublicKeyInfo PEM, as `openssl pkey` reads
them.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = structlog.get_logger("crawlwarden.audit.keys")

# The signed-note key name of every checkpoint (C2SP signed-note). One key signs the chains of all
# replicas, so the name is the log family rather than one replica's origin.
KEY_NAME = "crawlwarden-fetchlog"
# C2SP signed-note signature type byte for Ed25519.
_ED25519_TYPE = b"\x01"
GENERATED_KEY_NAME = "audit-signing.key"


class SigningKeyError(Exception):
    """The signing key cannot be used; the message says what to do."""


def key_id(public: Ed25519PublicKey, name: str = KEY_NAME) -> bytes:
    """key ID = SHA-256(key name || 0x0A || 0x01 || 32-byte public key)[:4] (C2SP signed-note)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n" + _ED25519_TYPE + raw).digest()[:4]


@dataclass(frozen=True)
class Verifier:
    public: Ed25519PublicKey
    name: str = KEY_NAME

    @property
    def key_id(self) -> bytes:
        return key_id(self.public, self.name)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self.public.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def public_pem(self) -> bytes:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the raw public key, base64: what `audit verify` prints to compare."""
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(hashlib.sha256(raw).digest()).decode()


@dataclass(frozen=True)
class Signer:
    private: Ed25519PrivateKey
    name: str = KEY_NAME
    source: str = ""  # the file it came from, for log lines

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.private.public_key(), self.name)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def public_pem(self) -> bytes:
        return self.verifier.public_pem()


def generate_key_pair(private_path: Path, public_path: Path | None = None) -> Signer:
    """Write a new key pair; the private file is created with mode 0600 and never overwritten."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never replace a key that may have signed checkpoints already.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(private_path, 0o600)  # whatever the umask said
    signer = Signer(private, source=str(private_path))
    if public_path is not None:
        public_path.parent.mkdir(parents=True, exist_ok=True)
        public_path.write_bytes(signer.public_pem())
    return signer


def load_private_key(path: Path) -> Signer:
    signer = read_private_key(path)
    # Only "other" bits warn: a Kubernetes Secret mounted with fsGroup is 0440 on purpose.
    mode = path.stat().st_mode & 0o007
    if mode:
        log.warning("signing_key_readable_by_others", path=str(path), mode=oct(mode))
    return signer


def read_private_key(path: Path) -> Signer:
    """The Ed25519 private key in `path`, or SigningKeyError saying what is wrong with it (what
    `policy check` and a reload report, and what would stop the next start)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigningKeyError(
            f"cannot read the audit signing key {path}: {e.strerror}; create one with "
            f"`crawlwarden keys generate --private {path} --public PUBLIC.pem`"
        ) from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(
            f"{path} is not an unencrypted PEM private key ({e}); "
            "use `crawlwarden keys generate` to make an Ed25519 key"
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}; checkpoints need Ed25519")
    return Signer(key, source=str(path))


def load_public_key(path: Path) -> Verifier:
    """A public key PEM, or the public half of a private key PEM (both are accepted)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigningKeyError(f"cannot read the public key {path}: {e.strerror}") from e
    try:
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            if not isinstance(private, Ed25519PrivateKey):
                raise SigningKeyError(f"{path} is not an Ed25519 key")
            return Verifier(private.public_key())
        public = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise SigningKeyError(
            f"{path} is not a PEM public key ({e}); get it from GET /v1/audit/public-key"
        ) from e
    if not isinstance(public, Ed25519PublicKey):
        raise SigningKeyError(f"{path} holds a {type(public).__name__}; checkpoints use Ed25519")
    return Verifier(public)


def load_signer(key_file: str | Path | None, data_dir: Path, *, shared_store: bool) -> Signer:
    """The signing key of a replica (policy `audit.signing_key_file`).

    Without one, an embedded gateway (SQLite) makes its own key in the data dir and says so in
    the log; with a shared PostgreSQL fetch log every replica must sign with the same configured
    key, or the export could not be verified with one public key, so that is an error.
    """
    if key_file:
        signer = load_private_key(Path(key_file))
        log.info("signing_key_loaded", path=str(key_file), key_id=signer.verifier.key_id.hex())
        return signer
    if shared_store:
        raise SigningKeyError(
            "a PostgreSQL fetch log needs audit.signing_key_file in the policy, the same key on "
            "every replica; create one with "
            "`crawlwarden keys generate --private FILE --public FILE`"
        )
    path = data_dir / GENERATED_KEY_NAME
    if path.exists():
        return load_private_key(path)
    try:
        signer = generate_key_pair(path, data_dir / "audit-signing.pub")
    except OSError as e:
        raise SigningKeyError(
            f"cannot write the signing key the gateway makes for itself, {e.filename or path}: "
            f"{e.strerror}; let the user it runs as write to the data dir {data_dir}, or set "
            "audit.signing_key_file in the policy to a key made with `crawlwarden keys generate`"
        ) from e
    log.warning(
        "signing_key_generated",
        path=str(path),
        public_key=str(data_dir / "audit-signing.pub"),
        key_id=signer.verifier.key_id.hex(),
        hint="set audit.signing_key_file in the policy to use a key you manage",
    )
    return signer


def cmd_generate(args: Any) -> int:
    """`crawlwarden keys generate --private FILE --public FILE`."""
    import sys

    try:
        signer = generate_key_pair(args.private, args.public)
    except FileExistsError:
        print(
            f"crawlwarden keys generate: {args.private} exists; it may have signed checkpoints "
            "already, so it is never overwritten: choose another path",
            file=sys.stderr,
        )
        return 2
    except OSError as e:
        print(f"crawlwarden keys generate: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.private} (private, mode 0600) and {args.public} (public); "
        f"key ID {signer.verifier.key_id.hex()}; set audit.signing_key_file: {args.private}"
    )
    return 0
