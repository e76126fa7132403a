"""The reference NAS's signing keys, JWKS and fire tokens, on real key files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import jwt
import pytest

from chronosd.errors import StateError
from chronosd.nas.keys import KEY_FILE, RETIRED_KEY_RETENTION, TOKEN_LIFETIME, KeyRing

NOW = 1_800_000_000.0


def verify(ring: KeyRing, token: str, *, now: float) -> dict[str, object]:
    """Verify *token* the way an agent does: against the published JWKS, by kid."""
    keys = jwt.PyJWKSet.from_dict(ring.jwks(now=now))
    kid = jwt.get_unverified_header(token)["kid"]
    claims: dict[str, object] = jwt.decode(
        token,
        keys[kid].key,
        algorithms=["EdDSA"],
        audience="agent:alpha",
        issuer="https://nas.example",
        options={"verify_exp": False, "verify_iat": False},
    )
    return claims


def test_first_start_creates_a_private_key_file_and_later_starts_reuse_it(
    tmp_path: Path,
) -> None:
    ring = KeyRing.load_or_create(tmp_path, now=NOW)
    mode = stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode)
    assert mode == 0o600
    again = KeyRing.load_or_create(tmp_path, now=NOW + 10)
    assert again.current().kid == ring.current().kid
    assert len(again.keys) == 1


def test_jwks_publishes_the_public_half_as_an_okp_key(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path, now=NOW)
    (key,) = ring.jwks(now=NOW)["keys"]
    assert set(key) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    secret = json.loads((tmp_path / KEY_FILE).read_text())["keys"][0]["seed"]
    assert secret not in json.dumps(ring.jwks(now=NOW))


def test_minted_fire_token_carries_the_contract_claims(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path, now=NOW)
    token = ring.mint_fire_token(
        issuer="https://nas.example", audience="agent:alpha", job_id="backup", now=NOW
    )
    assert jwt.get_unverified_header(token)["kid"] == ring.current().kid
    claims = verify(ring, token, now=NOW)
    assert claims["purpose"] == "cron_fire"
    assert claims["sub"] == "backup"
    assert claims["iat"] == int(NOW)
    assert claims["exp"] == int(NOW) + TOKEN_LIFETIME == int(NOW) + 90
    other = ring.mint_fire_token(
        issuer="https://nas.example", audience="agent:alpha", job_id="backup", now=NOW
    )
    assert verify(ring, other, now=NOW)["jti"] != claims["jti"]


def test_minted_fire_token_is_byte_for_byte_what_pyjwt_encodes(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path, now=NOW)
    token = ring.mint_fire_token(
        issuer="https://nas.example", audience="agent:alpha", job_id="backup", now=NOW
    )
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": ring.current().kid, "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert list(claims) == ["iss", "aud", "sub", "purpose", "iat", "exp", "jti"]
    assert len(claims["jti"]) == 32
    key = ring.current()
    # Ed25519 signatures are deterministic: the same claims give the same token.
    expected = jwt.encode(claims, key.private_key(), algorithm="EdDSA", headers={"kid": key.kid})
    assert token == expected


def test_token_minted_after_a_rotation_uses_the_new_key(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path, now=NOW)
    before = ring.mint_fire_token(
        issuer="https://nas.example", audience="agent:alpha", job_id="j", now=NOW
    )
    KeyRing.load_or_create(tmp_path).rotate(now=NOW + 1)  # as `chronosd nas keys rotate`
    after = ring.mint_fire_token(
        issuer="https://nas.example", audience="agent:alpha", job_id="j", now=NOW + 2
    )
    assert jwt.get_unverified_header(after)["kid"] == ring.current().kid
    assert jwt.get_unverified_header(after)["kid"] != jwt.get_unverified_header(before)["kid"]
    assert verify(ring, after, now=NOW + 2)["sub"] == "j"
    assert verify(ring, before, now=NOW + 2)["sub"] == "j"  # the old key is still published


def test_token_signed_by_another_key_does_not_verify(tmp_path: Path) -> None:
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    ours = KeyRing.load_or_create(tmp_path / "ours", now=NOW)
    theirs = KeyRing.load_or_create(tmp_path / "theirs", now=NOW)
    forged = theirs.mint_fire_token(
        issuer="https://nas.example", audience="agent:alpha", job_id="j", now=NOW
    )
    keys = jwt.PyJWKSet.from_dict(ours.jwks(now=NOW))
    with pytest.raises(jwt.PyJWTError):
        jwt.decode(
            forged,
            keys[ours.current().kid].key,
            algorithms=["EdDSA"],
            audience="agent:alpha",
            options={"verify_exp": False},
        )


def test_rotation_keeps_the_old_key_published_until_its_tokens_expired(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path, now=NOW)
    old_kid = ring.current().kid
    old_token = ring.mint_fire_token(
        issuer="https://nas.example", audience="agent:alpha", job_id="j", now=NOW
    )
    fresh = ring.rotate(now=NOW + 1)
    assert fresh.kid != old_kid
    assert ring.current().kid == fresh.kid
    new_token = ring.mint_fire_token(
        issuer="https://nas.example", audience="agent:alpha", job_id="j", now=NOW + 2
    )
    assert jwt.get_unverified_header(new_token)["kid"] == fresh.kid

    still = NOW + 1 + TOKEN_LIFETIME + 30  # the old token's exp plus the verifier's leeway
    assert {key["kid"] for key in ring.jwks(now=still)["keys"]} == {old_kid, fresh.kid}
    assert verify(ring, old_token, now=still)["sub"] == "j"
    assert verify(ring, new_token, now=still)["sub"] == "j"

    later = NOW + 1 + RETIRED_KEY_RETENTION
    assert [key["kid"] for key in ring.jwks(now=later)["keys"]] == [fresh.kid]
    ring.rotate(now=later + 1)
    assert old_kid not in {key.kid for key in ring.keys}  # dropped from the file too


def test_a_running_ring_sees_a_rotation_made_by_another_process(tmp_path: Path) -> None:
    server = KeyRing.load_or_create(tmp_path, now=NOW)
    cli = KeyRing.load_or_create(tmp_path, now=NOW)
    fresh = cli.rotate(now=NOW + 1)
    assert server.current().kid == fresh.kid
    assert len(server.jwks(now=NOW + 2)["keys"]) == 2


@pytest.mark.parametrize("content", ["", "{}", '{"keys": [{"kid": "k"}]}', "not json"])
def test_unreadable_key_file_is_a_state_error(tmp_path: Path, content: str) -> None:
    (tmp_path / KEY_FILE).write_text(content)
    with pytest.raises(StateError, match="signing keys"):
        KeyRing.load_or_create(tmp_path)
