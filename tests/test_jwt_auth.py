"""JwtAuth against real keys and a JWKS served over real HTTP on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from chronosd.errors import ConfigError
from chronosd.http.auth import make_authenticator
from chronosd.http.jwt_auth import JWKS_CACHE_KEY, JwtAuth
from chronosd.http.server import HTTPServer, Request, Response, bind_listener
from chronosd.state import StateDB
from chronosd.timefmt import utc_now

pytestmark = pytest.mark.anyio

AUDIENCE = "agent:test-box"
ISSUER = "http://nas.test"
WAIT = 10.0


# -- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    kid: str
    alg: str
    private: Any
    public_jwk: dict[str, Any]
    public_pem: bytes


def _signer(kid: str, alg: str, private: Any, to_jwk: Any) -> Signer:
    public = private.public_key()
    jwk = json.loads(to_jwk(public))
    jwk["kid"] = kid
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Signer(kid, alg, private, jwk, pem)


@pytest.fixture(scope="module")
def ed() -> Signer:
    return _signer("ed-1", "EdDSA", ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm.to_jwk)


@pytest.fixture(scope="module")
def rsa_signer() -> Signer:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _signer("rsa-1", "RS256", key, RSAAlgorithm.to_jwk)


@pytest.fixture(scope="module")
def es() -> Signer:
    return _signer("es-1", "ES256", ec.generate_private_key(ec.SECP256R1()), ECAlgorithm.to_jwk)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


# -- the JWKS server -----------------------------------------------------------------------------


@dataclass
class JwksServer:
    keys: list[dict[str, Any]]
    url: str = ""
    requests: int = 0
    status: int = 200

    async def handle(self, request: Request) -> Response:
        self.requests += 1
        if self.status != 200:
            return Response.json(self.status, {"error": "down"})
        return Response.json(200, {"keys": self.keys})


@asynccontextmanager
async def serving(jwks: JwksServer) -> AsyncIterator[JwksServer]:
    listener = await bind_listener("127.0.0.1", 0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    jwks.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    server = HTTPServer(jwks.handle)
    try:
        async with anyio.create_task_group() as group:
            await group.start(server.serve, [listener])
            try:
                yield jwks
            finally:
                server.stop_accepting()
    finally:
        await listener.aclose()


# -- the verifier under test -----------------------------------------------------------------------


@dataclass
class Clock:
    now: datetime = field(default_factory=lambda: utc_now().replace(microsecond=0))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def ts(self, offset: float = 0.0) -> int:
        return int(self.now.timestamp() + offset)


@dataclass
class Setup:
    jwks: JwksServer
    db: StateDB
    clock: Clock
    auth: JwtAuth

    def fresh_auth(self, db: StateDB | None = None) -> JwtAuth:
        return JwtAuth(
            jwks_url=self.jwks.url,
            audience=AUDIENCE,
            issuer=ISSUER,
            db=db or self.db,
            clock=self.clock,
        )

    def claims(self, **overrides: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "purpose": "cron_fire",
            "iat": self.clock.ts(),
            "exp": self.clock.ts(90),
        }
        base.update(overrides)
        return {name: value for name, value in base.items() if value is not None}


def sign(signer: Signer, claims: dict[str, Any], **header: Any) -> str:
    headers = {"kid": signer.kid, **header}
    return jwt.encode(claims, signer.private, algorithm=signer.alg, headers=headers)


def fire_request(authorization: str | None) -> Request:
    headers = () if authorization is None else (("authorization", authorization),)
    body = b'{"job_id": "a", "fire_at": "2026-06-18T12:34:56+00:00"}'
    return Request("POST", "/api/cron/fire", "/api/cron/fire", "", headers, body, ("127.0.0.1", 1))


async def check(auth: JwtAuth, token: str | None, *, scheme: str = "Bearer") -> tuple[bool, str]:
    header = None if token is None else f"{scheme} {token}"
    with anyio.fail_after(WAIT):
        result = await auth.verify(fire_request(header))
    if token:
        # The reason goes to logs: no part of the token may appear in it.
        for part in token.split("."):
            if len(part) > 8:
                assert part not in result.reason
    return result.ok, result.reason


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateDB]:
    with StateDB.open(tmp_path / "state") as db:
        yield db


@pytest.fixture
async def setup(state: StateDB, ed: Signer, rsa_signer: Signer, es: Signer) -> AsyncIterator[Setup]:
    jwks = JwksServer([ed.public_jwk, rsa_signer.public_jwk, es.public_jwk])
    async with serving(jwks):
        clock = Clock()
        auth = JwtAuth(jwks_url=jwks.url, audience=AUDIENCE, issuer=ISSUER, db=state, clock=clock)
        yield Setup(jwks, state, clock, auth)


# -- accepted ----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ed", "rsa_signer", "es"])
async def test_valid_token_is_accepted(
    setup: Setup, which: str, request: pytest.FixtureRequest
) -> None:
    signer: Signer = request.getfixturevalue(which)
    token = sign(signer, setup.claims(jti=f"id-{which}"))
    assert await check(setup.auth, token) == (True, "")


async def test_token_without_jti_is_accepted_twice(setup: Setup, ed: Signer) -> None:
    token = sign(ed, setup.claims())
    assert (await check(setup.auth, token))[0]
    assert (await check(setup.auth, token))[0]


async def test_audience_list_containing_ours_is_accepted(setup: Setup, ed: Signer) -> None:
    token = sign(ed, setup.claims(aud=["agent:other", AUDIENCE]))
    assert (await check(setup.auth, token))[0]


async def test_exp_within_leeway_is_accepted(setup: Setup, ed: Signer) -> None:
    token = sign(ed, setup.claims(exp=setup.clock.ts(-20), iat=setup.clock.ts(-110)))
    assert await check(setup.auth, token) == (True, "")


async def test_nbf_within_leeway_is_accepted(setup: Setup, ed: Signer) -> None:
    token = sign(ed, setup.claims(nbf=setup.clock.ts(20), iat=setup.clock.ts(20)))
    assert await check(setup.auth, token) == (True, "")


async def test_token_without_kid_uses_the_only_fitting_key(setup: Setup, ed: Signer) -> None:
    token = jwt.encode(setup.claims(), ed.private, algorithm="EdDSA")
    assert "kid" not in jwt.get_unverified_header(token)
    assert (await check(setup.auth, token))[0]


# -- refused -----------------------------------------------------------------------------------


async def test_unsigned_token_is_refused(setup: Setup, ed: Signer) -> None:
    for header in ({"alg": "none", "kid": ed.kid}, {"alg": "None", "kid": ed.kid}):
        token = f"{_segment(header)}.{_segment(setup.claims())}."
        ok, reason = await check(setup.auth, token)
        assert not ok
        assert "not allowed" in reason
    assert setup.jwks.requests == 0


@pytest.mark.parametrize("which", ["ed", "rsa_signer", "es"])
async def test_hmac_signed_with_the_public_key_is_refused(
    setup: Setup, which: str, request: pytest.FixtureRequest
) -> None:
    signer: Signer = request.getfixturevalue(which)
    secrets = [signer.public_pem, json.dumps(signer.public_jwk).encode()]
    for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
        for secret in secrets:
            signing_input = (
                f"{_segment({'alg': alg, 'kid': signer.kid})}.{_segment(setup.claims())}"
            )
            mac = hmac.new(secret, signing_input.encode(), digest).digest()
            ok, reason = await check(setup.auth, f"{signing_input}.{_b64(mac)}")
            assert not ok
            assert "not allowed" in reason


async def test_hmac_key_in_the_jwks_is_never_used(setup: Setup, ed: Signer) -> None:
    secret = b"a shared secret someone published"
    setup.jwks.keys.append({"kty": "oct", "kid": "sym", "k": _b64(secret)})
    hs_token = jwt.encode(setup.claims(), secret, algorithm="HS256", headers={"kid": "sym"})
    assert not (await check(setup.auth, hs_token))[0]
    # An allowed algorithm naming the symmetric key is refused too.
    signing_input = f"{_segment({'alg': 'EdDSA', 'kid': 'sym'})}.{_segment(setup.claims())}"
    forged = f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), 'sha256').digest())}"
    ok, reason = await check(setup.auth, forged)
    assert not ok
    assert "does not fit" in reason


async def test_algorithm_that_does_not_fit_the_key_is_refused(
    setup: Setup, ed: Signer, rsa_signer: Signer
) -> None:
    # Signed with the RSA key, but the header names the Ed25519 key's kid.
    token = sign(rsa_signer, setup.claims(), kid=ed.kid)
    ok, reason = await check(setup.auth, token)
    assert not ok
    assert "does not fit" in reason


async def test_wrong_key_with_a_known_kid_is_refused(setup: Setup, ed: Signer) -> None:
    impostor = _signer(ed.kid, "EdDSA", ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm.to_jwk)
    ok, reason = await check(setup.auth, sign(impostor, setup.claims()))
    assert (ok, reason) == (False, "signature mismatch")


async def test_tampered_claims_are_refused(setup: Setup, ed: Signer) -> None:
    head, _, signature = sign(ed, setup.claims()).split(".")
    tampered = f"{head}.{_segment(setup.claims(aud='agent:someone-else'))}.{signature}"
    assert await check(setup.auth, tampered) == (False, "signature mismatch")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"exp": -40}, "token expired"),
        ({"nbf": 120}, "token not yet valid (nbf in the future)"),
        ({"iat": 120}, "token not yet valid (iat in the future)"),
        ({"aud": "agent:other"}, "wrong audience"),
        ({"iss": "http://evil.test"}, "wrong issuer"),
        ({"purpose": None}, "purpose is not cron_fire"),
        ({"purpose": "login"}, "purpose is not cron_fire"),
        ({"exp": None}, "missing claim exp"),
        ({"aud": None}, "missing claim aud"),
        ({"iss": None}, "missing claim iss"),
        ({"exp": "soon"}, "exp is not a number"),
    ],
)
async def test_bad_claims_are_refused(
    setup: Setup, ed: Signer, overrides: dict[str, Any], expected: str
) -> None:
    relative = {
        name: setup.clock.ts(value)
        if name in ("exp", "nbf", "iat") and isinstance(value, int)
        else value
        for name, value in overrides.items()
    }
    claims = setup.claims(**relative)
    if "exp" in relative and isinstance(relative["exp"], str):
        # PyJWT refuses to encode a non-numeric exp; build the token by hand.
        signing_input = f"{_segment({'alg': 'EdDSA', 'kid': ed.kid})}.{_segment(claims)}"
        token = f"{signing_input}.{_b64(ed.private.sign(signing_input.encode()))}"
    else:
        token = sign(ed, claims)
    assert await check(setup.auth, token) == (False, expected)


async def test_replayed_jti_is_refused(setup: Setup, ed: Signer) -> None:
    token = sign(ed, setup.claims(jti="once"))
    assert (await check(setup.auth, token))[0]
    assert await check(setup.auth, token) == (False, "replayed jti")
    # Another process over the same database refuses it as well.
    assert await check(setup.fresh_auth(), token) == (False, "replayed jti")
    # A different token carrying the same jti is a replay too.
    other = sign(ed, setup.claims(jti="once", exp=setup.clock.ts(60)))
    assert await check(setup.auth, other) == (False, "replayed jti")


async def test_refused_token_does_not_consume_its_jti(setup: Setup, ed: Signer) -> None:
    wrong = sign(ed, setup.claims(jti="j-1", purpose="other"))
    assert not (await check(setup.auth, wrong))[0]
    assert (await check(setup.auth, sign(ed, setup.claims(jti="j-1"))))[0]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "missing Authorization header"),
        ("Basic dXNlcjpwYXNz", "Authorization is not a Bearer token"),
        ("Bearer", "empty bearer token"),
        ("Bearer   ", "empty bearer token"),
        ("Bearer not-a-jwt", "malformed token"),
        ("Bearer a.b.c", "malformed token"),
        ("Bearer " + "x" * 20000, "bearer token too long"),
    ],
)
async def test_malformed_authorization_is_refused(
    setup: Setup, header: str | None, expected: str
) -> None:
    with anyio.fail_after(WAIT):
        result = await setup.auth.verify(fire_request(header))
    assert (result.ok, result.reason) == (False, expected)
    assert setup.jwks.requests == 0


async def test_bearer_scheme_is_case_insensitive(setup: Setup, ed: Signer) -> None:
    assert (await check(setup.auth, sign(ed, setup.claims()), scheme="bearer"))[0]


async def test_garbage_with_a_valid_header_is_refused(setup: Setup, ed: Signer) -> None:
    head = _segment({"alg": "EdDSA", "kid": ed.kid})
    for token in (f"{head}.!!!.???", f"{head}.{_b64(b'not json')}.{_b64(b'sig')}", f"{head}.."):
        ok, _ = await check(setup.auth, token)
        assert not ok


# -- the JWKS cache ----------------------------------------------------------------------------


async def test_jwks_is_fetched_once_and_cached_in_the_database(setup: Setup, ed: Signer) -> None:
    for n in range(3):
        assert (await check(setup.auth, sign(ed, setup.claims(jti=f"t{n}"))))[0]
    assert setup.jwks.requests == 1
    cached = json.loads(setup.db.get_meta(JWKS_CACHE_KEY) or "{}")
    assert cached["url"] == setup.jwks.url
    assert {key["kid"] for key in cached["jwks"]["keys"]} == {"ed-1", "rsa-1", "es-1"}
    assert cached["fetched_at"]


async def test_fresh_process_uses_the_cached_jwks_without_fetching(
    setup: Setup, ed: Signer, tmp_path: Path
) -> None:
    assert (await check(setup.auth, sign(ed, setup.claims())))[0]
    assert setup.jwks.requests == 1
    setup.jwks.status = 503  # a fetch now would fail, so acceptance proves the cache served
    with StateDB.open(tmp_path / "state") as other_connection:
        later = setup.fresh_auth(other_connection)
        assert (await check(later, sign(ed, setup.claims(jti="warm"))))[0]
    assert setup.jwks.requests == 1


async def test_unknown_kid_refetches_at_most_once_a_minute(setup: Setup, ed: Signer) -> None:
    assert (await check(setup.auth, sign(ed, setup.claims())))[0]
    setup.clock.advance(61)  # past the window of the first fetch
    assert setup.jwks.requests == 1

    stranger = _signer("new-1", "EdDSA", ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm.to_jwk)
    assert await check(setup.auth, sign(stranger, setup.claims())) == (
        False,
        "unknown kid 'new-1'",
    )
    assert setup.jwks.requests == 2
    # Within the minute neither this process nor another one fetches again.
    assert not (await check(setup.auth, sign(stranger, setup.claims())))[0]
    assert not (await check(setup.fresh_auth(), sign(stranger, setup.claims())))[0]
    assert setup.jwks.requests == 2

    # The NAS rotates to the new key; a minute later the token is accepted after one fetch.
    setup.jwks.keys.append(stranger.public_jwk)
    setup.clock.advance(59)
    assert not (await check(setup.auth, sign(stranger, setup.claims())))[0]
    assert setup.jwks.requests == 2
    setup.clock.advance(2)
    assert (await check(setup.auth, sign(stranger, setup.claims())))[0]
    assert setup.jwks.requests == 3
    # Known now, to this process and (through the database) to a fresh one.
    assert (await check(setup.fresh_auth(), sign(stranger, setup.claims())))[0]
    assert setup.jwks.requests == 3


async def test_concurrent_unknown_kids_fetch_once(setup: Setup, ed: Signer) -> None:
    stranger = _signer("new-2", "EdDSA", ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm.to_jwk)
    results: list[bool] = []

    async def one() -> None:
        results.append((await check(setup.auth, sign(stranger, setup.claims())))[0])

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(one)
    assert results == [False] * 10
    assert setup.jwks.requests == 1


async def test_unreachable_jwks_refuses_without_raising(state: StateDB, ed: Signer) -> None:
    listener = await bind_listener("127.0.0.1", 0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there any more
    auth = JwtAuth(
        jwks_url=f"http://127.0.0.1:{port}/jwks.json",
        audience=AUDIENCE,
        issuer=ISSUER,
        db=state,
        http_timeout=2.0,
    )
    now = int(utc_now().timestamp())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "purpose": "cron_fire", "exp": now + 90}
    assert await check(auth, sign(ed, claims)) == (False, "JWKS not available")


async def test_failed_fetch_is_rate_limited_too(setup: Setup, ed: Signer) -> None:
    setup.jwks.status = 500
    assert await check(setup.auth, sign(ed, setup.claims())) == (False, "JWKS not available")
    assert await check(setup.auth, sign(ed, setup.claims())) == (False, "JWKS not available")
    assert setup.jwks.requests == 1
    setup.jwks.status = 200
    setup.clock.advance(61)
    assert (await check(setup.auth, sign(ed, setup.claims())))[0]
    assert setup.jwks.requests == 2


async def test_old_cache_is_refreshed_and_kept_when_refresh_fails(setup: Setup, ed: Signer) -> None:
    assert (await check(setup.auth, sign(ed, setup.claims())))[0]
    setup.clock.advance(86400 + 1)
    setup.jwks.status = 503
    assert (await check(setup.auth, sign(ed, setup.claims())))[0]  # the old copy still serves
    assert setup.jwks.requests == 2
    setup.jwks.status = 200
    setup.jwks.keys.remove(ed.public_jwk)  # the NAS withdrew the key
    setup.clock.advance(61)
    assert await check(setup.auth, sign(ed, setup.claims())) == (False, "unknown kid 'ed-1'")
    assert setup.jwks.requests == 3


async def test_cache_for_another_jwks_url_is_ignored(setup: Setup, ed: Signer) -> None:
    setup.db.set_meta(
        JWKS_CACHE_KEY,
        json.dumps(
            {
                "url": "http://elsewhere.test/jwks.json",
                "fetched_at": setup.clock.now.isoformat(),
                "jwks": {"keys": [ed.public_jwk]},
            }
        ),
    )
    assert (await check(setup.auth, sign(ed, setup.claims())))[0]
    assert setup.jwks.requests == 1


@pytest.mark.filterwarnings("ignore:The RSA key is 1024 bits")
async def test_short_rsa_key_is_refused(setup: Setup) -> None:
    weak = _signer(
        "rsa-weak",
        "RS256",
        rsa.generate_private_key(public_exponent=65537, key_size=1024),
        RSAAlgorithm.to_jwk,
    )
    setup.jwks.keys.append(weak.public_jwk)
    ok, reason = await check(setup.auth, sign(weak, setup.claims()))
    assert not ok
    assert "shorter than 2048 bits" in reason


# -- construction ------------------------------------------------------------------------------


def test_bad_settings_are_config_errors(state: StateDB) -> None:
    with pytest.raises(ConfigError, match="jwks_url"):
        JwtAuth(jwks_url="ftp://x", audience=AUDIENCE, issuer=ISSUER, db=state)
    with pytest.raises(ConfigError, match="audience"):
        JwtAuth(jwks_url="http://x/j", audience="", issuer=ISSUER, db=state)
    with pytest.raises(ConfigError, match="issuer"):
        JwtAuth(jwks_url="http://x/j", audience=AUDIENCE, issuer="", db=state)


async def test_make_authenticator_builds_jwt_from_auth_config(setup: Setup, ed: Signer) -> None:
    from chronosd.config import AuthConfig

    config = AuthConfig(mode="jwt", jwks_url=setup.jwks.url, audience=AUDIENCE, issuer=ISSUER)
    auth = make_authenticator("jwt", config=config, db=setup.db, clock=setup.clock)
    assert isinstance(auth, JwtAuth)
    result = await auth.verify(fire_request(f"Bearer {sign(ed, setup.claims())}"))
    assert result.ok
    with pytest.raises(ConfigError, match=r"auth\.audience"):
        make_authenticator("jwt", config=AuthConfig(jwks_url=setup.jwks.url), db=setup.db)


# -- the compact JWS, taken apart by hand ----------------------------------------------------------


def raw_signature(signer: Signer, data: bytes) -> bytes:
    """The JWS signature of *data*, made with cryptography alone (no PyJWT)."""
    if signer.alg == "EdDSA":
        return bytes(signer.private.sign(data))
    if signer.alg == "ES256":
        r, s = decode_dss_signature(signer.private.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return bytes(signer.private.sign(data, padding.PKCS1v15(), hashes.SHA256()))


def hand_token(signer: Signer, claims: Any, **header: Any) -> str:
    head = {"alg": signer.alg, "kid": signer.kid, "typ": "JWT", **header}
    signing_input = f"{_segment(head)}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(raw_signature(signer, signing_input.encode()))}"


def with_segment(token: str, index: int, segment: str) -> str:
    parts = token.split(".")
    parts[index] = segment
    return ".".join(parts)


@pytest.mark.parametrize("which", ["ed", "rsa_signer", "es"])
async def test_hand_signed_token_is_accepted_for_each_algorithm(
    setup: Setup, which: str, request: pytest.FixtureRequest
) -> None:
    signer: Signer = request.getfixturevalue(which)
    assert await check(setup.auth, hand_token(signer, setup.claims(jti=f"h-{which}"))) == (
        True,
        "",
    )


async def test_ed448_key_verifies_eddsa(setup: Setup) -> None:
    private = ed448.Ed448PrivateKey.generate()
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    jwk = {"kty": "OKP", "crv": "Ed448", "x": _b64(public), "kid": "ed448-1"}
    setup.jwks.keys.append(jwk)
    signer = Signer("ed448-1", "EdDSA", private, jwk, b"")
    assert (await check(setup.auth, hand_token(signer, setup.claims())))[0]


@pytest.mark.parametrize("which", ["ed", "rsa_signer", "es"])
async def test_tampered_signature_is_refused(
    setup: Setup, which: str, request: pytest.FixtureRequest
) -> None:
    signer: Signer = request.getfixturevalue(which)
    token = hand_token(signer, setup.claims())
    signature = bytearray(base64.urlsafe_b64decode(token.split(".")[2] + "=="))
    signature[len(signature) // 2] ^= 0x01
    tampered = with_segment(token, 2, _b64(bytes(signature)))
    assert await check(setup.auth, tampered) == (False, "signature mismatch")
    # Cut short, or empty, it does not verify either.
    assert await check(setup.auth, with_segment(token, 2, _b64(bytes(signature[:-4])))) == (
        False,
        "signature mismatch",
    )
    assert await check(setup.auth, with_segment(token, 2, "")) == (False, "signature mismatch")


async def test_tampered_payload_is_refused(setup: Setup, ed: Signer) -> None:
    token = hand_token(ed, setup.claims())
    for claims in (setup.claims(exp=setup.clock.ts(3600)), setup.claims(purpose="other")):
        forged = with_segment(token, 1, _b64(json.dumps(claims).encode()))
        assert await check(setup.auth, forged) == (False, "signature mismatch")


async def test_der_encoded_ecdsa_signature_is_refused(setup: Setup, es: Signer) -> None:
    token = hand_token(es, setup.claims())
    signing_input = token.rsplit(".", 1)[0].encode()
    der = es.private.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    assert await check(setup.auth, with_segment(token, 2, _b64(der))) == (
        False,
        "signature mismatch",
    )


async def test_alg_none_is_refused_whatever_it_carries(setup: Setup, ed: Signer) -> None:
    for alg in ("none", "NONE", "", None):
        header = {"alg": alg, "kid": ed.kid}
        for signature in ("", _b64(b"anything")):
            token = f"{_segment(header)}.{_segment(setup.claims())}.{signature}"
            ok, reason = await check(setup.auth, token)
            assert not ok
            assert "not allowed" in reason
    no_alg = f"{_segment({'kid': ed.kid})}.{_segment(setup.claims())}."
    assert await check(setup.auth, no_alg) == (False, "algorithm None not allowed")
    assert setup.jwks.requests == 0


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512", "hs256", "PS256", "ES512", "RS512"])
async def test_algorithms_off_the_allow_list_are_refused(
    setup: Setup, ed: Signer, alg: str
) -> None:
    raw_public = ed.private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    signing_input = f"{_segment({'alg': alg, 'kid': ed.kid})}.{_segment(setup.claims())}"
    # An HMAC keyed with the raw public key, the most likely forgery for a verifier that
    # lets the header choose how the key is used.
    mac = hmac.new(raw_public, signing_input.encode(), hashlib.sha256).digest()
    ok, reason = await check(setup.auth, f"{signing_input}.{_b64(mac)}")
    assert not ok
    assert "not allowed" in reason
    assert setup.jwks.requests == 0


@pytest.mark.parametrize(
    ("alg", "which"),
    [
        ("ES256", "ed"),
        ("RS256", "ed"),
        ("EdDSA", "es"),
        ("RS256", "es"),
        ("EdDSA", "rsa_signer"),
        ("ES256", "rsa_signer"),
    ],
)
async def test_alg_that_does_not_match_the_key_type_is_refused(
    setup: Setup, alg: str, which: str, request: pytest.FixtureRequest
) -> None:
    holder: Signer = request.getfixturevalue(which)
    # Signed correctly for *alg* with a key of that type, but naming a key of another type.
    own = {
        "EdDSA": request.getfixturevalue("ed"),
        "ES256": request.getfixturevalue("es"),
        "RS256": request.getfixturevalue("rsa_signer"),
    }[alg]
    token = hand_token(own, setup.claims(), kid=holder.kid)
    ok, reason = await check(setup.auth, token)
    assert not ok
    assert reason == f"key {holder.kid!r} does not fit algorithm {alg}"


async def test_jwk_that_names_another_alg_is_refused(setup: Setup, ed: Signer) -> None:
    setup.jwks.keys.append({**ed.public_jwk, "kid": "ed-as-es", "alg": "ES256"})
    ok, reason = await check(setup.auth, hand_token(ed, setup.claims(), kid="ed-as-es"))
    assert (ok, reason) == (False, "key 'ed-as-es' does not fit algorithm EdDSA")


@pytest.mark.parametrize("count", [1, 2, 4, 5])
async def test_token_without_exactly_three_segments_is_refused(
    setup: Setup, ed: Signer, count: int
) -> None:
    parts = hand_token(ed, setup.claims()).split(".")
    token = ".".join((parts * 2)[:count])
    assert await check(setup.auth, token) == (False, "malformed token")
    assert setup.jwks.requests == 0


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda s: s + "=" * (-len(s) % 4 or 4), id="padding"),
        pytest.param(lambda s: s[:-1] + "+", id="plus"),
        pytest.param(lambda s: s[:-1] + "/", id="slash"),
        pytest.param(lambda s: s[:5] + " " + s[5:], id="space"),
        pytest.param(lambda s: s + "A" * ((1 - len(s)) % 4 or 4), id="length-1-mod-4"),
        pytest.param(lambda s: s[:3] + "\u00e9" + s[4:], id="non-ascii"),
    ],
)
async def test_segment_that_is_not_canonical_base64url_is_refused(
    setup: Setup, ed: Signer, index: int, spoil: Callable[[str], str]
) -> None:
    token = hand_token(ed, setup.claims())
    segment = token.split(".")[index]
    assert await check(setup.auth, with_segment(token, index, spoil(segment))) == (
        False,
        "malformed token",
    )


async def test_stray_bits_in_the_last_base64_character_are_refused(
    setup: Setup, ed: Signer
) -> None:
    token = hand_token(ed, setup.claims())
    signature = token.split(".")[2]  # 64 bytes: 86 characters, the last holds 2 spare bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    stray = signature[:-1] + alphabet[last | 1]
    assert base64.urlsafe_b64decode(stray + "==") == base64.urlsafe_b64decode(signature + "==")
    assert await check(setup.auth, with_segment(token, 2, stray)) == (False, "malformed token")
    assert (await check(setup.auth, token))[0]


@pytest.mark.parametrize(
    "header", ['["EdDSA"]', '"EdDSA"', "null", "7", "{", '{"alg": "EdDSA"'], ids=repr
)
async def test_header_that_is_not_a_json_object_is_refused(
    setup: Setup, ed: Signer, header: str
) -> None:
    token = f"{_b64(header.encode())}.{_segment(setup.claims())}.{_b64(b'sig')}"
    assert await check(setup.auth, token) == (False, "malformed token")


@pytest.mark.parametrize("payload", [[1, 2], "claims", None, 42])
async def test_signed_payload_that_is_not_a_json_object_is_refused(
    setup: Setup, ed: Signer, payload: Any
) -> None:
    assert await check(setup.auth, hand_token(ed, payload)) == (
        False,
        "payload is not a JSON object",
    )


async def test_signed_payload_that_is_not_json_is_refused(setup: Setup, ed: Signer) -> None:
    signing_input = f"{_segment({'alg': 'EdDSA', 'kid': ed.kid})}.{_b64(b'{not json')}"
    token = f"{signing_input}.{_b64(raw_signature(ed, signing_input.encode()))}"
    assert await check(setup.auth, token) == (False, "payload is not a JSON object")


async def test_kid_that_is_not_a_string_is_refused(setup: Setup, ed: Signer) -> None:
    for kid in (7, ["ed-1"], {"kid": "ed-1"}):
        assert await check(setup.auth, hand_token(ed, setup.claims(), kid=kid)) == (
            False,
            "malformed token",
        )


async def test_critical_header_extensions_are_refused(setup: Setup, ed: Signer) -> None:
    for extra in ({"crit": ["exp"], "exp": 1}, {"crit": ["b64"], "b64": False}, {"b64": False}):
        ok, reason = await check(setup.auth, hand_token(ed, setup.claims(), **extra))
        assert (ok, reason) == (False, "unsupported critical header")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"exp": None}, "missing claim exp"),
        ({"aud": None}, "missing claim aud"),
        ({"aud": ""}, "missing claim aud"),
        ({"aud": []}, "missing claim aud"),
        ({"iss": None}, "missing claim iss"),
        ({"aud": ["agent:other", 7]}, "wrong audience"),
        ({"aud": {"agent": AUDIENCE}}, "wrong audience"),
        ({"aud": AUDIENCE.upper()}, "wrong audience"),
        ({"iss": ["http://nas.test"]}, "wrong issuer"),
        ({"iss": ISSUER + "/"}, "wrong issuer"),
        ({"exp": True}, "exp is not a number"),
        ({"exp": 1e400}, "exp is not a number"),
        ({"nbf": "now"}, "nbf is not a number"),
        ({"jti": 7}, "malformed jti"),
        ({"jti": ""}, "malformed jti"),
    ],
)
async def test_hand_made_bad_claims_are_refused(
    setup: Setup, ed: Signer, overrides: dict[str, Any], expected: str
) -> None:
    claims = {**setup.claims(), **overrides}
    claims = {name: value for name, value in claims.items() if value is not None}
    assert await check(setup.auth, hand_token(ed, claims)) == (False, expected)


async def test_unusable_jwk_is_refused(setup: Setup, ed: Signer, es: Signer) -> None:
    setup.jwks.keys += [
        {**ed.public_jwk, "kid": "short-x", "x": _b64(b"\x01" * 31)},
        {**ed.public_jwk, "kid": "no-x", "x": None},
        {**es.public_jwk, "kid": "off-curve", "y": _b64(b"\x01" * 32)},
        {**es.public_jwk, "kid": "short-y", "y": _b64(b"\x01" * 31)},
    ]
    for kid, signer in (("short-x", ed), ("no-x", ed), ("off-curve", es), ("short-y", es)):
        assert await check(setup.auth, hand_token(signer, setup.claims(), kid=kid)) == (
            False,
            f"key {kid!r} in the JWKS is unusable",
        )


async def test_key_replaced_under_the_same_kid_is_not_served_from_the_key_cache(
    setup: Setup, ed: Signer
) -> None:
    assert (await check(setup.auth, hand_token(ed, setup.claims())))[0]
    successor = _signer(ed.kid, "EdDSA", ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm.to_jwk)
    setup.jwks.keys[:] = [successor.public_jwk]
    setup.clock.advance(86400 + 1)  # the cached JWKS is old: it is fetched again
    assert (await check(setup.auth, hand_token(successor, setup.claims())))[0]
    assert setup.jwks.requests == 2
    assert await check(setup.auth, hand_token(ed, setup.claims())) == (False, "signature mismatch")


def test_verifying_a_fire_token_does_not_import_pyjwt_or_x509(
    state: StateDB, ed: Signer, tmp_path: Path
) -> None:
    now = utc_now().replace(microsecond=0)
    state.set_meta(
        JWKS_CACHE_KEY,
        json.dumps(
            {
                "url": "http://127.0.0.1:9/jwks.json",
                "fetched_at": now.isoformat(),
                "jwks": {"keys": [ed.public_jwk]},
            }
        ),
    )
    stamp = int(now.timestamp())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "purpose": "cron_fire", "exp": stamp + 90}
    token = hand_token(ed, claims)
    script = f"""
import sys, anyio
from pathlib import Path
from chronosd.http.jwt_auth import JwtAuth
from chronosd.state import StateDB
from tests.test_jwt_auth import fire_request

db = StateDB.open(Path({str(tmp_path / "state")!r}))
auth = JwtAuth(jwks_url="http://127.0.0.1:9/jwks.json", audience={AUDIENCE!r},
               issuer={ISSUER!r}, db=db)
result = anyio.run(auth.verify, fire_request("Bearer " + {token!r}))
heavy = sorted(m for m in sys.modules if m == "jwt" or m.startswith(("jwt.", "cryptography.x509")))
print(result.ok, result.reason, heavy)
"""
    # The test module imports PyJWT, so the check runs in a fresh interpreter that does not.
    script = script.replace("from tests.test_jwt_auth import fire_request", _FIRE_REQUEST_SOURCE)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "[]"]


_FIRE_REQUEST_SOURCE = """
from chronosd.http.server import Request

def fire_request(authorization):
    return Request("POST", "/api/cron/fire", "/api/cron/fire", "", (("authorization",
                   authorization),), b"{}", ("127.0.0.1", 1))
"""
