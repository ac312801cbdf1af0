"""One token buys one certificate, whatever bytes carry it.

A token without a ``jti`` (or with an empty one) is spent under a digest of what its
signature covers, decoded; a token with a ``jti`` under that ``jti``. Neither key may change
when the token is re-sent with whitespace around it (the parser strips it), with its ECDSA
signature re-encoded as (r, n - s) (ECDSA verifies both), or with other re-encodings of its
segments. Hypothesis sends such variants of a spent token to a running CA: each must get 401
and leave the store as it was.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import ECKey
from joserfc.registry import HeaderParameter

from federatls._jwk import ProvisionerKey
from federatls._keys import build_csr, new_private_key
from federatls._token import Token, mint_renew_token, renew_audience
from federatls.ca import CAServer, SQLiteStore

from harness import PKI

pytestmark = pytest.mark.anyio

SUBJECT = "svc.cloud.internal"
CSR = (
    build_csr(new_private_key(), SUBJECT, [SUBJECT])
    .public_bytes(serialization.Encoding.PEM)
    .decode()
)
# The order of P-256's base point: (r, s) and (r, n - s) are both valid ECDSA signatures.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# Every character ``str.strip`` removes, ASCII and not.
WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
JTIS = {"no jti": None, "empty jti": "", "jti": "0123abcd" * 8}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def malleated(token: str) -> str:
    """The same token with its ES256 signature (r, s) re-encoded as (r, n - s)."""
    header, payload, signature = token.split(".")
    raw = _unb64(signature)
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    return f"{header}.{payload}.{_b64(r + (P256_ORDER - s).to_bytes(32, 'big'))}"


def padded(token: str, part: int, pad: str) -> str:
    """One segment with base64 padding (or other junk) appended."""
    parts = token.split(".")
    parts[part] += pad
    return ".".join(parts)


def other_trailing_bits(token: str, part: int) -> str:
    """One segment whose last character keeps its meaningful bits but changes the unused
    trailing bits (a non-canonical encoding of the same bytes), where the length allows it."""
    parts = token.split(".")
    segment = parts[part]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    unused = {2: 4, 3: 2}.get(len(segment) % 4, 0)  # bits of the last character not used
    if unused:
        index = alphabet.index(segment[-1])
        parts[part] = segment[:-1] + alphabet[index ^ ((1 << unused) - 1)]
    return ".".join(parts)


def _variants(token: str) -> st.SearchStrategy[str]:
    """Byte-level variants of ``token``: the ones the CA accepts as the same token, and
    re-encodings it must refuse as malformed; whitespace around any of them."""
    core = st.one_of(
        st.just(token),
        st.just(malleated(token)),
        st.builds(padded, st.just(token), st.integers(0, 2), st.sampled_from(["=", "==", " "])),
        st.builds(padded, st.just(malleated(token)), st.integers(0, 2), st.just("=")),
        st.builds(other_trailing_bits, st.just(token), st.integers(0, 2)),
    )
    space = st.text(alphabet=WHITESPACE, max_size=4)
    return st.builds(lambda before, t, after: before + t + after, space, core, space).filter(
        lambda t: t != token
    )


@pytest.fixture
def http(ca: CAServer, pki: PKI) -> Iterator[httpx.Client]:
    ctx = ssl.create_default_context(cafile=str(pki.root_path))
    with httpx.Client(verify=ctx, base_url=pki.url, timeout=20) as client:
        yield client


def _store(ca: CAServer) -> SQLiteStore:
    store = ca.authority.store
    assert isinstance(store, SQLiteStore)
    return store


def _token(pki: PKI, jti: str | None) -> str:
    claims: dict[str, Any] = pki.claims(SUBJECT)
    claims.pop("jti")
    if jti is not None:
        claims["jti"] = jti
    return pki.forge(claims)


def _sign(http: httpx.Client, ott: str) -> httpx.Response:
    return http.post("/1.0/sign", json={"csr": CSR, "ott": ott})


async def _in_thread(run: Callable[[], None]) -> None:
    await anyio.to_thread.run_sync(run)


@pytest.mark.parametrize("jti", JTIS.values(), ids=list(JTIS))
async def test_variants_of_a_spent_token_are_refused(
    ca: CAServer, pki: PKI, http: httpx.Client, jti: str | None
) -> None:
    """Once a token is spent, no byte-level variant of it buys another certificate: every
    one gets 401 and nothing new is stored."""
    token = _token(pki, jti)

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(variant=_variants(token))
    def replay(variant: str) -> None:
        response = _sign(http, variant)
        assert response.status_code == 401, (variant, response.text)

    def run() -> None:
        first = _sign(http, token)
        assert first.status_code == 201, first.text
        replay()

    await _in_thread(run)
    assert _store(ca).counts() == {"used_tokens": 1, "certificates": 1, "revocations": 0}


VARIANTS: dict[str, Callable[[str], str]] = {
    "newline after": lambda t: t + "\n",
    "spaces around": lambda t: "  " + t + " ",
    "(r, n - s)": malleated,
    "(r, n - s) and a tab": lambda t: "\t" + malleated(t),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=list(VARIANTS))
@pytest.mark.parametrize("jti", JTIS.values(), ids=list(JTIS))
async def test_variant_of_an_unspent_token_is_accepted_once(
    ca: CAServer,
    pki: PKI,
    http: httpx.Client,
    jti: str | None,
    variant: Callable[[str], str],
) -> None:
    """Twin: each variant is a token the CA accepts (201) while unspent; it then spends the
    original, which gets 401."""
    token = _token(pki, jti)

    def run() -> None:
        first = _sign(http, variant(token))
        assert first.status_code == 201, first.text
        again = _sign(http, token)
        assert again.status_code == 401, again.text

    await _in_thread(run)
    assert _store(ca).counts() == {"used_tokens": 1, "certificates": 1, "revocations": 0}


async def test_original_token_is_accepted_once(ca: CAServer, pki: PKI, http: httpx.Client) -> None:
    """Twin: a token without ``jti``, unspent, buys one certificate; the same string again
    gets 401."""
    token = _token(pki, None)
    assert "jti" not in json.loads(_unb64(token.split(".")[1]))

    def run() -> None:
        assert _sign(http, token).status_code == 201
        assert _sign(http, token).status_code == 401

    await _in_thread(run)
    assert _store(ca).counts() == {"used_tokens": 1, "certificates": 1, "revocations": 0}


def _renew_token_without_jti(pki: PKI, chain: list[Any], key: ec.EllipticCurvePrivateKey) -> str:
    """A Bearer renew token as ``mint_renew_token`` makes it, less its ``jti``."""
    minted = mint_renew_token(chain, key, audience=renew_audience(pki.url), now=pki.clock())
    header_segment, payload_segment, _ = minted.split(".")
    header = json.loads(_unb64(header_segment))
    claims = json.loads(_unb64(payload_segment))
    del claims["jti"]
    claims["nbf"] -= secrets.randbelow(30)  # a token unlike any other minted this second
    registry = jws.JWSRegistry(header_registry={"x5cInsecure": HeaderParameter("x5c", "list[str]")})
    registry.max_header_length = 8 * 1024
    return jws.serialize_compact(
        header, json.dumps(claims), ECKey.import_key(key), registry=registry
    )


async def test_variants_of_a_spent_renew_token_are_refused(
    ca: CAServer, pki: PKI, http: httpx.Client
) -> None:
    """A Bearer renew token without ``jti`` renews once; re-sent with extra whitespace or
    as (r, n - s), it gets 401."""
    chain, key = await pki.enroll(SUBJECT)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    token = _renew_token_without_jti(pki, chain, key)

    def renew(bearer: str) -> int:
        return http.post("/renew", headers={"Authorization": "Bearer " + bearer}).status_code

    def run() -> None:
        assert renew(token) == 201
        assert renew(" " + token) == 401
        assert renew(malleated(token)) == 401
        assert renew("\t" + malleated(token)) == 401

    await _in_thread(run)
    assert _store(ca).counts()["certificates"] == 2


def _pure_token(jti: str | None, **claims: Any) -> str:
    key = ProvisionerKey.generate()
    payload = {"sub": SUBJECT, "exp": 2_000_000_000, **claims}
    if jti is not None:
        payload["jti"] = jti
    header = {"alg": "ES256", "kid": key.kid, "typ": "JWT"}
    return jws.serialize_compact(header, json.dumps(payload), key.key, algorithms=["ES256"])


def test_digest_names_the_token_not_its_encoding() -> None:
    """``Token.digest`` is the same for a token, the token in whitespace, and the token with
    its signature re-encoded as (r, n - s)."""
    token = _pure_token(None)
    digests = {Token.parse(t).digest for t in (token, f" {token}\n", malleated(token))}
    assert len(digests) == 1


def test_digest_differs_between_tokens() -> None:
    """Twin: tokens whose header (another key id) or claims differ have different digests."""
    token = _pure_token(None)
    others = [_pure_token(None, sub=SUBJECT + "x"), _pure_token(""), _pure_token(None)]
    digests = {Token.parse(t).digest for t in (token, *others)}
    assert len(digests) == 4
