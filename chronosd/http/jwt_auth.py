"""``auth.mode = "jwt"``: fire calls carry a short-lived token signed by the NAS.

The token is checked against the NAS's JWKS (``auth.jwks_url``). chronosd is started per
wake-up, so the JWKS lives in the state database (meta ``jwks_cache``): a warm wake-up verifies
without touching the network. A token naming a ``kid`` the cache does not hold makes us fetch
the JWKS again, at most once per ``refetch_interval``; that limit is a row in the replay cache,
so short-lived processes started one after another honour it too, and two racing processes
cannot both win it.

Why the algorithm is decided here and not by the token: a verifier that lets the token's
``alg`` pick how the key is used can be made to check an HMAC made with the *public* key as the
secret. The token's ``alg`` must be on the allow-list (EdDSA, ES256, RS256), the JWK's type and
curve must fit it, and the key is only ever used for that one algorithm.

The compact JWS is taken apart here rather than by PyJWT: ``import jwt`` loads
``cryptography.x509`` and every algorithm family (tens of milliseconds) on every wake-up,
although a fire token needs one signature check. Each segment must be canonical base64url
without padding; the signature is checked with the narrowest part of cryptography that can
(``ed25519``; ``ec`` or ``rsa`` only when such a key is used), before the payload is parsed.
The claims are then checked as PyJWT would (``exp``, ``aud``, ``iss`` required, audience and
issuer compared exactly) and the times (``exp``, ``nbf``, ``iat``) against *clock*. The JWKS
is fetched with chronosd's own HTTP client (`chronosd.http.client`); it and cryptography are
imported on first use so they stay off the start-up path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import anyio

from chronosd.errors import ChronosError, ConfigError
from chronosd.http.auth import AuthResult
from chronosd.http.server import Request
from chronosd.state import StateDB
from chronosd.timefmt import parse_instant, to_wire, utc_now

JWKS_CACHE_KEY: Final = "jwks_cache"
FIRE_PURPOSE: Final = "cron_fire"
ALLOWED_ALGORITHMS: Final = frozenset({"EdDSA", "ES256", "RS256"})

DEFAULT_LEEWAY: Final = 30.0
DEFAULT_REFETCH_INTERVAL: Final = 60.0
DEFAULT_HTTP_TIMEOUT: Final = 10.0
# Past this age the cached JWKS is fetched again (rate limit permitting) so a key the NAS
# withdrew stops verifying within a day; a failed fetch keeps the old copy in use.
DEFAULT_CACHE_MAX_AGE: Final = 86400.0

_MAX_TOKEN_CHARS: Final = 16384
_MAX_JWKS_BYTES: Final = 1 << 20
_MIN_RSA_BITS: Final = 2048
# Which JWKs may verify which algorithm: key type and, where it has one, curve.
_KEY_SHAPES: Final[Mapping[str, tuple[str, frozenset[str] | None]]] = {
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
    "ES256": ("EC", frozenset({"P-256"})),
    "RS256": ("RSA", None),
}

# base64url without padding (RFC 7515 section 2); canonical form is checked after decoding.
_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
# Constructed public keys, by the JWK material they came from; a bound, not an expectation.
_MAX_CACHED_KEYS: Final = 64

JWK = dict[str, Any]


def _log() -> Any:
    from chronosd.log import get_logger

    return get_logger()


def _show(value: object, limit: int = 40) -> str:
    """A header value from the token, quoted and cut short, safe for a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: object) -> float | None:
    """A NumericDate claim as float, or None when it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _b64decode(segment: str) -> bytes | None:
    """The bytes of a base64url segment, or None unless it is canonical and unpadded.

    Canonical: re-encoding gives the same text, so no two spellings (padding, stray bits in the
    last character) name the same token.
    """
    if len(segment) % 4 == 1 or not _BASE64URL.fullmatch(segment):
        return None
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=") != segment.encode("ascii"):
        return None
    return data


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class _Token(NamedTuple):
    """A compact JWS split into its parts; nothing in it is verified yet.

    A NamedTuple, as `_KeySet`: defined on every wake-up, where a dataclass costs ~1 ms.
    """

    header: dict[str, Any]
    payload: bytes  # decoded from base64url, parsed only once the signature holds
    signing_input: bytes
    signature: bytes

    @classmethod
    def parse(cls, token: str) -> _Token | None:
        parts = token.split(".")
        if len(parts) != 3 or not token.isascii():
            return None
        decoded = [_b64decode(part) for part in parts]
        head, payload, signature = decoded
        if head is None or payload is None or signature is None:
            return None
        header = _json_object(head)
        if header is None:
            return None
        return cls(header, payload, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def _jwk_bytes(jwk: JWK, name: str) -> bytes:
    """A base64url member of a JWK (trailing padding tolerated); ValueError when malformed."""
    value = jwk.get(name)
    data = _b64decode(value.rstrip("=")) if isinstance(value, str) else None
    if not data:
        raise ValueError(f"JWK member {name} is missing or not base64url")
    return data


def _jwk_material(jwk: JWK, alg: str) -> tuple[str, ...]:
    """What identifies the public key in *jwk* for *alg*: the cache key for `_public_key`."""
    members = {"EdDSA": ("crv", "x"), "ES256": ("crv", "x", "y"), "RS256": ("n", "e")}[alg]
    return (alg, *(str(jwk.get(name)) for name in members))


def _public_key(jwk: JWK, alg: str) -> Any:
    """The cryptography public key for *jwk* (which `_fits` *alg*); ValueError when unusable.

    Only the public members are read: a JWKS that also publishes ``d`` is not used to sign.
    """
    if alg == "EdDSA":
        x = _jwk_bytes(jwk, "x")
        if jwk.get("crv") == "Ed448":
            from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey

            return Ed448PublicKey.from_public_bytes(x)
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return Ed25519PublicKey.from_public_bytes(x)
    if alg == "ES256":
        from cryptography.hazmat.primitives.asymmetric import ec

        x, y = _jwk_bytes(jwk, "x"), _jwk_bytes(jwk, "y")
        if len(x) != 32 or len(y) != 32:
            raise ValueError("P-256 coordinates must be 32 bytes")
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
        )
        return numbers.public_key()
    from cryptography.hazmat.primitives.asymmetric import rsa

    e = int.from_bytes(_jwk_bytes(jwk, "e"), "big")
    n = int.from_bytes(_jwk_bytes(jwk, "n"), "big")
    return rsa.RSAPublicNumbers(e, n).public_key()


def _signature_holds(key: Any, alg: str, signature: bytes, signing_input: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        if alg == "EdDSA":
            key.verify(signature, signing_input)
        elif alg == "ES256":
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

            # JWS carries ECDSA as the raw pair r || s, 32 bytes each (RFC 7518 3.4).
            if len(signature) != 64:
                return False
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
        else:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding

            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def _check_audience(claims: Mapping[str, Any], audience: str) -> str | None:
    """PyJWT's audience rule: a string, or a list of strings, that names ours."""
    value = claims.get("aud")
    if not value:
        return "missing claim aud"
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return "wrong audience"
    return None if audience in names else "wrong audience"


class _KeySet(NamedTuple):
    """One JWKS as fetched: the keys that have a ``kid``, and those that do not."""

    by_kid: Mapping[str, JWK]
    unnamed: tuple[JWK, ...]
    fetched_at: datetime

    @classmethod
    def parse(cls, document: object, fetched_at: datetime) -> _KeySet | None:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            return None
        by_kid: dict[str, JWK] = {}
        unnamed: list[JWK] = []
        for key in document["keys"]:
            if not isinstance(key, dict):
                continue
            kid = key.get("kid")
            if isinstance(kid, str):
                by_kid.setdefault(kid, key)  # RFC 7517: kids are unique; keep the first
            elif kid is None:
                unnamed.append(key)
        return cls(by_kid, tuple(unnamed), fetched_at)

    def find(self, kid: str | None, alg: str) -> JWK | None:
        if kid is not None:
            return self.by_kid.get(kid)
        # Without a kid the token is only usable when exactly one key could have signed it.
        fitting = [key for key in (*self.by_kid.values(), *self.unnamed) if _fits(key, alg)]
        return fitting[0] if len(fitting) == 1 else None


def _fits(jwk: JWK, alg: str) -> bool:
    """Whether *jwk* may verify a signature made with *alg* (an allowed algorithm)."""
    kty, curves = _KEY_SHAPES[alg]
    if jwk.get("kty") != kty:
        return False
    if curves is not None and jwk.get("crv") not in curves:
        return False
    if "alg" in jwk and jwk["alg"] != alg:
        return False
    if "use" in jwk and jwk["use"] != "sig":
        return False
    key_ops = jwk.get("key_ops")
    return key_ops is None or (isinstance(key_ops, list) and "verify" in key_ops)


class JwtAuth:
    """Verifies ``Authorization: Bearer <JWT>`` against the NAS's JWKS (see the module doc)."""

    def __init__(
        self,
        *,
        jwks_url: str,
        audience: str,
        issuer: str,
        db: StateDB,
        clock: Callable[[], datetime] = utc_now,
        leeway: float = DEFAULT_LEEWAY,
        refetch_interval: float = DEFAULT_REFETCH_INTERVAL,
        http_timeout: float = DEFAULT_HTTP_TIMEOUT,
        cache_max_age: float = DEFAULT_CACHE_MAX_AGE,
    ) -> None:
        if not jwks_url.startswith(("https://", "http://")):
            raise ConfigError(
                f"auth.jwks_url {jwks_url!r} is not an http(s) URL; set it to the NAS's JWKS, "
                "e.g. https://nas.example.net/.well-known/jwks.json"
            )
        if not audience:
            raise ConfigError("auth.audience is empty; set it to agent:<name> as the NAS knows us")
        if not issuer:
            raise ConfigError("auth.issuer is empty; set it to the NAS's public base URL")
        for name, value in (
            ("leeway", leeway),
            ("refetch_interval", refetch_interval),
            ("http_timeout", http_timeout),
            ("cache_max_age", cache_max_age),
        ):
            if not value >= 0:
                raise ConfigError(f"auth: jwt {name} must not be negative, got {value}")
        if not http_timeout > 0:
            raise ConfigError(f"auth: jwt http_timeout must be positive, got {http_timeout}")
        self._jwks_url = jwks_url
        self._audience = audience
        self._issuer = issuer
        self._db = db
        self._clock = clock
        self._leeway = leeway
        self._refetch_interval = refetch_interval
        self._http_timeout = http_timeout
        self._cache_max_age = cache_max_age
        self._keys: _KeySet | None = None
        self._public_keys: dict[tuple[str, ...], Any] = {}
        self._fetch_lock: anyio.Lock | None = None
        # One rate-limit row per JWKS URL, so changing the URL is not held back by the old one.
        self._fetch_slot = "jwks-fetch:" + hashlib.sha256(jwks_url.encode()).hexdigest()[:32]

    # -- verification ---------------------------------------------------------------------

    async def verify(self, request: Request) -> AuthResult:
        try:
            return await self._verify(request)
        except Exception as exc:  # a refusal, never a 500: the caller only learns 401
            return AuthResult(False, f"token check failed ({type(exc).__name__})")

    async def _verify(self, request: Request) -> AuthResult:
        header = request.header("authorization")
        if header is None:
            return AuthResult(False, "missing Authorization header")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return AuthResult(False, "Authorization is not a Bearer token")
        token = token.strip()
        if not token:
            return AuthResult(False, "empty bearer token")
        if len(token) > _MAX_TOKEN_CHARS:
            return AuthResult(False, "bearer token too long")

        parsed = _Token.parse(token)
        if parsed is None:
            return AuthResult(False, "malformed token")
        head = parsed.header
        kid = head.get("kid")
        if kid is not None and not isinstance(kid, str):
            return AuthResult(False, "malformed token")
        # No JWS extension is understood here, so a critical one must refuse (RFC 7515 4.1.11);
        # b64=false would change what was signed (RFC 7797).
        if "crit" in head or head.get("b64", True) is not True:
            return AuthResult(False, "unsupported critical header")
        alg = head.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            return AuthResult(False, f"algorithm {_show(alg)} not allowed")

        now = self._clock()
        jwk = await self._key_for(kid, alg, now)
        if isinstance(jwk, str):
            return AuthResult(False, jwk)
        if not _fits(jwk, alg):
            return AuthResult(False, f"key {_show(kid)} does not fit algorithm {alg}")
        material = _jwk_material(jwk, alg)
        key = self._public_keys.get(material)
        if key is None:
            try:
                key = _public_key(jwk, alg)
            except (ValueError, TypeError, OverflowError):
                return AuthResult(False, f"key {_show(kid)} in the JWKS is unusable")
            if len(self._public_keys) >= _MAX_CACHED_KEYS:
                self._public_keys.clear()
            self._public_keys[material] = key
        if alg == "RS256" and key.key_size < _MIN_RSA_BITS:
            return AuthResult(False, f"key {_show(kid)} is shorter than {_MIN_RSA_BITS} bits")
        if not _signature_holds(key, alg, parsed.signature, parsed.signing_input):
            return AuthResult(False, "signature mismatch")

        claims = _json_object(parsed.payload)
        if claims is None:
            return AuthResult(False, "payload is not a JSON object")
        for name in ("exp", "aud", "iss"):
            if claims.get(name) is None:
                return AuthResult(False, f"missing claim {name}")
        if claims["iss"] != self._issuer:
            return AuthResult(False, "wrong issuer")
        refusal = _check_audience(claims, self._audience)
        if refusal is not None:
            return AuthResult(False, refusal)
        return self._check_claims(claims, now)

    def _check_claims(self, claims: dict[str, Any], now: datetime) -> AuthResult:
        moment = now.timestamp()
        exp = _number(claims.get("exp"))
        if exp is None:
            return AuthResult(False, "exp is not a number")
        if exp + self._leeway <= moment:
            return AuthResult(False, "token expired")
        for name in ("nbf", "iat"):
            if name not in claims:
                continue
            value = _number(claims[name])
            if value is None:
                return AuthResult(False, f"{name} is not a number")
            if value > moment + self._leeway:
                return AuthResult(False, f"token not yet valid ({name} in the future)")
        if claims.get("purpose") != FIRE_PURPOSE:
            return AuthResult(False, f"purpose is not {FIRE_PURPOSE}")
        jti = claims.get("jti")
        if jti is not None:
            if not isinstance(jti, str) or not jti or len(jti) > 256:
                return AuthResult(False, "malformed jti")
            # The token is accepted until exp + leeway, so it must be remembered that long.
            try:
                expires = datetime.fromtimestamp(exp + self._leeway, UTC)
            except (OverflowError, OSError, ValueError):
                return AuthResult(False, "exp out of range")
            if not self._db.remember_nonce(f"jwt:{jti}", expires=expires, now=now):
                return AuthResult(False, "replayed jti")
        return AuthResult(True)

    # -- the JWKS -------------------------------------------------------------------------

    async def _key_for(self, kid: str | None, alg: str, now: datetime) -> JWK | str:
        """The JWK for (kid, alg), fetching the JWKS when needed; a refusal reason otherwise."""
        found = self._fresh_key(kid, alg, now)
        if found is not None:
            return found
        # Another process may have fetched since we read the cache (or we never read it).
        cached = self._load_cache()
        if cached is not None:
            self._keys = cached
            found = self._fresh_key(kid, alg, now)
            if found is not None:
                return found
        if self._fetch_lock is None:
            self._fetch_lock = anyio.Lock()
        before = self._keys
        async with self._fetch_lock:
            # A task that waited here may find that the fetch it wanted was just done.
            if self._keys is not before:
                found = self._fresh_key(kid, alg, now)
                if found is not None:
                    return found
            fetched = await self._fetch_if_allowed(now)
            if fetched is not None:
                self._keys = fetched
        if self._keys is None:
            return "JWKS not available"
        # A key from a cache past its age still serves when the JWKS could not be fetched.
        found = self._keys.find(kid, alg)
        if found is None:
            return "no key fits token without kid" if kid is None else f"unknown kid {_show(kid)}"
        return found

    def _fresh_key(self, kid: str | None, alg: str, now: datetime) -> JWK | None:
        keys = self._keys
        if keys is None or (now - keys.fetched_at).total_seconds() > self._cache_max_age:
            return None
        return keys.find(kid, alg)

    def _load_cache(self) -> _KeySet | None:
        try:
            raw = self._db.get_meta(JWKS_CACHE_KEY)
        except ChronosError as exc:
            _log().warning("jwks.cache_unreadable", error=str(exc))
            return None
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
            if entry.get("url") != self._jwks_url:
                return None  # cached for another NAS; the configuration changed
            return _KeySet.parse(entry["jwks"], parse_instant(entry["fetched_at"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            _log().warning("jwks.cache_unreadable", error="malformed jwks_cache entry")
            return None

    async def _fetch_if_allowed(self, now: datetime) -> _KeySet | None:
        window = now + timedelta(seconds=self._refetch_interval)
        if not self._db.remember_nonce(self._fetch_slot, expires=window, now=now):
            _log().info("jwks.fetch_skipped", url=self._jwks_url, reason="rate limited")
            return None
        document = await self._download()
        if document is None:
            return None
        keys = _KeySet.parse(document, now)
        if keys is None:
            _log().warning("jwks.fetch_failed", url=self._jwks_url, error="not a JWKS document")
            return None
        entry = {"url": self._jwks_url, "fetched_at": to_wire(now), "jwks": document}
        self._db.set_meta(JWKS_CACHE_KEY, json.dumps(entry, separators=(",", ":")))
        _log().info("jwks.fetched", url=self._jwks_url, keys=len(keys.by_kid) + len(keys.unnamed))
        return keys

    async def _download(self) -> object | None:
        # chronosd's own client (as the NAS provider's), not httpx: importing httpx and
        # building its client cost ~0.2 s of a wake-up's event loop, and the first fire with
        # an uncached key holds every other fire of the burst until the JWKS is in.
        from urllib.parse import urlsplit

        from chronosd.http.client import HTTPClient, RequestFailed

        parts = urlsplit(self._jwks_url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            client = HTTPClient(
                f"{parts.scheme}://{parts.netloc}",
                timeout=self._http_timeout,
                max_idle=0,
                max_body=_MAX_JWKS_BYTES,
            )
            try:
                response = await client.request(
                    "GET", target, headers=(("accept", "application/json"),)
                )
            finally:
                await client.aclose()
            if response.status != 200:
                raise ValueError(f"HTTP {response.status} {response.reason}".rstrip())
            document: object = json.loads(response.body)
        except (RequestFailed, ValueError, UnicodeDecodeError) as exc:
            error = " ".join(str(exc).split()) or type(exc).__name__
            _log().warning("jwks.fetch_failed", url=self._jwks_url, error=error)
            return None
        return document
