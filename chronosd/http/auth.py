"""Who may call ``POST /api/cron/fire``: the authenticators for ``auth.mode``.

Every mode is a class with ``async verify(request) -> AuthResult``, built by
`make_authenticator`. ``hmac`` and ``none`` live here; ``jwt`` (JWKS-verified tokens from the
NAS) is `chronosd.http.jwt_auth.JwtAuth`, imported lazily by the factory so that the other
modes never load it (nor, through it, cryptography).

A refusal's ``reason`` is for the log only: the route answers every refusal with the same
``401 {"error": "invalid fire token"}`` so a caller learns nothing from probing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import anyio.abc

from chronosd.errors import ConfigError
from chronosd.http.server import Request, format_listener_address, is_loopback_listener
from chronosd.timefmt import utc_now

SIGNATURE_HEADER = "chronos-signature"
DEFAULT_TOLERANCE = 300.0

_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class AuthResult:
    """Whether a fire call may proceed, and why not."""

    ok: bool
    reason: str = ""  # for logs only, never echoed to clients


class FireAuthenticator(Protocol):
    async def verify(self, request: Request) -> AuthResult: ...


class RememberNonce(Protocol):
    """Record *nonce* until *expires*; False when it was already recorded (a replay).

    `chronosd.state.StateDB.remember_signature` has this shape; HmacAuth derives *expires*
    from the signed ``t``, so a replay always presents the same (expires, nonce) pair.
    """

    def __call__(self, nonce: str, *, expires: datetime, now: datetime) -> bool: ...


class NoAuth:
    """``auth.mode = "none"``: every caller is accepted (loopback listeners only)."""

    async def verify(self, request: Request) -> AuthResult:
        return AuthResult(True)


class HmacAuth:
    """``auth.mode = "hmac"``: a shared secret signs the timestamp and the raw body.

    Header: ``Chronos-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``.
    Several ``v1=`` entries are allowed (a sender rotating secrets signs with both); other
    keys are ignored so senders can add schemes. A signature is accepted once, within
    *tolerance* seconds of *clock* in either direction.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        remember_nonce: RememberNonce,
        clock: Callable[[], datetime] = utc_now,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        if not secret:
            raise ConfigError(
                "auth: the hmac secret is empty; put a random secret in auth.hmac_secret_file"
            )
        if not tolerance > 0:
            raise ConfigError(f"auth: hmac tolerance must be positive, got {tolerance}")
        self._secret = secret
        self._remember_nonce = remember_nonce
        self._clock = clock
        self._tolerance = tolerance

    async def verify(self, request: Request) -> AuthResult:
        header = request.header(SIGNATURE_HEADER)
        if header is None:
            return AuthResult(False, "missing Chronos-Signature header")
        parsed = _parse_signature_header(header)
        if parsed is None:
            return AuthResult(False, "malformed Chronos-Signature header")
        timestamp, candidates = parsed
        now = self._clock()
        # Compared as numbers first: a far-off t may not even fit in a datetime.
        if abs(now.timestamp() - int(timestamp)) > self._tolerance:
            return AuthResult(False, "signature timestamp outside tolerance")
        expected = hmac.new(
            self._secret, timestamp.encode("ascii") + b"." + request.body, hashlib.sha256
        ).digest()
        # Every candidate is compared, in constant time, so timing tells nothing about which.
        matches = [hmac.compare_digest(candidate, expected) for candidate in candidates]
        if not any(matches):
            return AuthResult(False, "signature mismatch")
        # Only a verified signature reaches the replay cache, so forgeries cannot fill it;
        # it can be forgotten once its timestamp has gone stale anyway. expires follows from t
        # alone, so a replay of this signature presents the same key.
        expires = datetime.fromtimestamp(int(timestamp), UTC) + timedelta(seconds=self._tolerance)
        if not self._remember_nonce(f"hmac:{expected.hex()}", expires=expires, now=now):
            return AuthResult(False, "replayed signature")
        return AuthResult(True)


def _parse_signature_header(value: str) -> tuple[str, list[bytes]] | None:
    """(the t digits exactly as sent, the v1 digests), or None when malformed."""
    timestamp: str | None = None
    candidates: list[bytes] = []
    for item in value.split(","):
        key, sep, field = item.partition("=")
        key, field = key.strip(), field.strip()
        if not sep:
            return None
        if key == "t":
            if timestamp is not None or not _TIMESTAMP.fullmatch(field):
                return None
            timestamp = field
        elif key == "v1":
            if not _HEX_SHA256.fullmatch(field):
                return None
            candidates.append(bytes.fromhex(field))
    if timestamp is None or not candidates:
        return None
    return timestamp, candidates


def sign_hmac(secret: bytes, body: bytes, t: int) -> str:
    """The ``Chronos-Signature`` header value for *body* sent at unix time *t*."""
    stamp = str(int(t))
    digest = hmac.new(secret, stamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def read_secret_file(path: Path) -> bytes:
    """The secret in *path*, without its trailing newline."""
    hint = f"put a random secret in it, e.g. `openssl rand -hex 32 > {path}`"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"auth.hmac_secret_file {path}: cannot read it ({exc.strerror}); {hint}"
        ) from exc
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise ConfigError(f"auth.hmac_secret_file {path} is empty; {hint}")
    return secret


def make_authenticator(mode: str, **kwargs: Any) -> FireAuthenticator:
    """Build the authenticator for ``auth.mode``.

    Each mode takes the keywords it needs and ignores the rest, so the daemon can pass one set:

    - ``"none"``: ``listeners``, checked with `check_none_allowed` when given (a caller that
      leaves them out must have called it itself);
    - ``"hmac"``: the secret from ``secret`` (bytes), else ``secret_file``, else
      ``config.hmac_secret_file``; the replay cache from ``remember_nonce``, else
      ``db.remember_signature``; optional ``clock`` and ``tolerance``;
    - ``"jwt"``: ``db`` (the StateDB holding the JWKS and replay caches, required),
      ``config`` (an AuthConfig for ``jwks_url``, ``audience``, ``issuer``; keywords of those
      names win), optional ``clock``, ``leeway``, ``refetch_interval``, ``http_timeout``,
      ``cache_max_age`` (see `chronosd.http.jwt_auth.JwtAuth`).
    """
    if mode == "none":
        if kwargs.get("listeners") is not None:
            check_none_allowed(kwargs["listeners"])
        return NoAuth()
    if mode == "hmac":
        return _make_hmac(kwargs)
    if mode == "jwt":
        # Imported here, not at the top: jwt_auth imports this module for AuthResult.
        from chronosd.http.jwt_auth import JwtAuth

        if kwargs.get("db") is None:
            raise TypeError("make_authenticator('jwt') needs db= for the JWKS and replay caches")
        config = kwargs.get("config")
        settings: dict[str, str] = {
            name: str(kwargs.get(name) or getattr(config, name, "") or "")
            for name in ("jwks_url", "audience", "issuer")
        }
        for name, value in settings.items():
            if not value:
                raise ConfigError(f"auth.mode jwt needs auth.{name}; set it in the config")
        jwt_options: dict[str, Any] = {
            name: kwargs[name]
            for name in ("clock", "leeway", "refetch_interval", "http_timeout", "cache_max_age")
            if name in kwargs
        }
        return JwtAuth(
            jwks_url=settings["jwks_url"],
            audience=settings["audience"],
            issuer=settings["issuer"],
            db=kwargs["db"],
            **jwt_options,
        )
    raise ConfigError(f'auth.mode "{mode}" is unknown; use "jwt", "hmac" or "none"')


def _make_hmac(kwargs: dict[str, Any]) -> HmacAuth:
    secret = kwargs.get("secret")
    if secret is None:
        secret_file = kwargs.get("secret_file") or getattr(
            kwargs.get("config"), "hmac_secret_file", None
        )
        if not secret_file:
            raise ConfigError(
                "auth.mode hmac needs auth.hmac_secret_file; set it to a file with a secret"
            )
        secret = read_secret_file(Path(secret_file))
    remember_nonce = kwargs.get("remember_nonce")
    if remember_nonce is None:
        remember_nonce = getattr(kwargs.get("db"), "remember_signature", None)
    if remember_nonce is None:
        raise TypeError("make_authenticator('hmac') needs remember_nonce= or db= for replays")
    options = {name: kwargs[name] for name in ("clock", "tolerance") if name in kwargs}
    return HmacAuth(secret, remember_nonce=remember_nonce, **options)


def check_none_allowed(listeners: Iterable[anyio.abc.SocketListener]) -> None:
    """Refuse ``auth.mode = "none"`` unless every listener is loopback (or a Unix socket).

    Logging the start-up warning that the mode is on is left to the caller.
    """
    listeners = list(listeners)
    exposed = [
        format_listener_address(each) for each in listeners if not is_loopback_listener(each)
    ]
    if exposed:
        raise ConfigError(
            f"auth.mode none is only allowed on loopback, but chronosd listens on "
            f"{', '.join(exposed)}; listen on 127.0.0.1 or ::1, or use auth.mode hmac or jwt"
        )
