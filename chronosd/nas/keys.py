"""The NAS's Ed25519 signing keys: the key file, the JWKS, and minting fire tokens.

The keys live in ``signing-keys.json`` (mode 0600) in the NAS state directory, written whole
and renamed into place. ``chronosd nas keys rotate`` rewrites the file while the server runs;
the server notices by the file's identity (inode, size, mtime) on each use, so the next token
is signed with the new key. A retired key stays in the JWKS for `RETIRED_KEY_RETENTION` seconds:
every token it signed has expired by then, including the verifier's leeway.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chronosd.errors import StateError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_FILE = "signing-keys.json"
TOKEN_LIFETIME = 90
"""Seconds a fire token is valid (``exp - iat``)."""
VERIFIER_LEEWAY = 30
"""The clock leeway chronosd allows on ``exp`` (CONTRACT.md)."""
RETIRED_KEY_RETENTION = TOKEN_LIFETIME + 2 * VERIFIER_LEEWAY
"""Seconds a retired key stays published: its last token's lifetime, leeway and clock skew."""
PURPOSE = "cron_fire"
ALGORITHM = "EdDSA"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class SigningKey:
    """One Ed25519 signing key of the reference NAS."""

    kid: str
    seed: bytes  # the 32-byte Ed25519 private key
    created_at: float
    retired_at: float | None = None

    def private_key(self) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def public_bytes(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self.private_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def jwk(self) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _b64url(self.public_bytes()),
            "kid": self.kid,
            "alg": ALGORITHM,
            "use": "sig",
        }

    def published(self, now: float) -> bool:
        return self.retired_at is None or now < self.retired_at + RETIRED_KEY_RETENTION


def generate_key(now: float) -> SigningKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return SigningKey(kid=_thumbprint(public), seed=seed, created_at=now)


def _thumbprint(public: bytes) -> str:
    # RFC 7638: the SHA-256 of the required members, sorted, without whitespace.
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _b64url(public)}, separators=(",", ":")
    )
    return _b64url(hashlib.sha256(canonical.encode()).digest())


class KeyRing:
    """The keys in one key file: exactly one active key, plus retired ones."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: tuple[SigningKey, ...] = ()
        self._identity: tuple[int, int, int] | None = None
        # Per seed: the encoded JWS header and the loaded private key. Loading a key and
        # encoding through PyJWT cost more than the signature itself.
        self._signers: dict[bytes, tuple[str, Ed25519PrivateKey]] = {}

    @classmethod
    def load_or_create(cls, state_dir: Path, *, now: float | None = None) -> KeyRing:
        """The key ring of *state_dir*, creating the first key when there is none."""
        ring = cls(state_dir / KEY_FILE)
        if not ring.path.exists():
            ring._save((generate_key(time.time() if now is None else now),))
        ring._reload()
        return ring

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        self._reload()
        return self._keys

    def current(self) -> SigningKey:
        for key in self.keys:
            if key.retired_at is None:
                return key
        raise StateError(f"{self.path}: no active signing key; run `chronosd nas keys rotate`")

    def rotate(self, *, now: float | None = None) -> SigningKey:
        """Make a new key the active one; retire the old, drop keys no token can still need."""
        at = time.time() if now is None else now
        self._reload()
        kept = tuple(
            key if key.retired_at is not None else replace(key, retired_at=at)
            for key in self._keys
            if key.published(at)
        )
        fresh = generate_key(at)
        self._save((fresh, *kept))
        self._reload()
        return fresh

    def jwks(self, *, now: float | None = None) -> dict[str, list[dict[str, str]]]:
        at = time.time() if now is None else now
        return {"keys": [key.jwk() for key in self.keys if key.published(at)]}

    def mint_fire_token(
        self, *, issuer: str, audience: str, job_id: str, now: float | None = None
    ) -> str:
        """A fire token for *audience*: EdDSA, ``kid`` in the header, valid for 90 s.

        The compact JWS is built here as PyJWT builds it (same header, same claims, compact
        JSON), without its per-call overhead.
        """
        key = self.current()
        signer = self._signers.get(key.seed)
        if signer is None:
            header = json.dumps(
                {"alg": ALGORITHM, "kid": key.kid, "typ": "JWT"},
                separators=(",", ":"),
                sort_keys=True,
            )
            signer = self._signers[key.seed] = (_b64url(header.encode()), key.private_key())
        header_segment, private_key = signer
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": issuer,
            "aud": audience,
            "sub": job_id,
            "purpose": PURPOSE,
            "iat": issued,
            "exp": issued + TOKEN_LIFETIME,
            "jti": os.urandom(16).hex(),
        }
        payload = json.dumps(claims, separators=(",", ":")).encode()
        signing_input = f"{header_segment}.{_b64url(payload)}"
        signature = private_key.sign(signing_input.encode("ascii"))
        return f"{signing_input}.{_b64url(signature)}"

    # -- the file ------------------------------------------------------------------------------

    def _reload(self) -> None:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise StateError(
                f"{self.path}: cannot read the signing keys ({exc.strerror}); "
                "restore the file or remove it to start with a new key"
            ) from exc
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if identity == self._identity:
            return
        self._keys = self._parse(self.path.read_text(encoding="utf-8"))
        self._identity = identity
        seeds = {key.seed for key in self._keys}
        self._signers = {seed: s for seed, s in self._signers.items() if seed in seeds}

    def _parse(self, text: str) -> tuple[SigningKey, ...]:
        try:
            document = json.loads(text)
            keys = tuple(
                SigningKey(
                    kid=str(entry["kid"]),
                    seed=_b64url_decode(str(entry["seed"])),
                    created_at=float(entry["created_at"]),
                    retired_at=(
                        None if entry.get("retired_at") is None else float(entry["retired_at"])
                    ),
                )
                for entry in document["keys"]
            )
            if any(len(key.seed) != 32 for key in keys):
                raise ValueError("a seed is not 32 bytes")
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"{self.path}: signing keys are unreadable ({exc}); "
                "restore the file or remove it to start with a new key"
            ) from exc
        return keys

    def _save(self, keys: tuple[SigningKey, ...]) -> None:
        document = {
            "keys": [
                {
                    "kid": key.kid,
                    "seed": _b64url(key.seed),
                    "created_at": key.created_at,
                    "retired_at": key.retired_at,
                }
                for key in keys
            ]
        }
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
