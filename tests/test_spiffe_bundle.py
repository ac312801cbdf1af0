"""The SPIFFE bundle module (_spiffe) without any network: a JWK Set built from roots parses
back to the same roots, sequence and hint; each malformed field is refused by name; keys the
SPIFFE specifications say to ignore are ignored and noted; trust domain and SPIFFE ID checks.

The rules are those of the SPIFFE Trust Domain and Bundle specification (section 4) and the
X509-SVID specification (section 6), as docs/spiffe.md states them.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from federatls._errors import BadMaterialError
from federatls._spiffe import (
    MAX_BUNDLE_BYTES,
    MAX_BUNDLE_KEYS,
    SpiffeBundle,
    roots_digest,
    spiffe_id_problem,
    trust_domain_of,
    trust_domain_problem,
)
from federatls._x509 import fingerprint

FAST = settings(max_examples=60, deadline=None, database=None)
NOW = datetime(2030, 6, 1, tzinfo=UTC)


def make_root(key: CertificateIssuerPrivateKeyTypes, name: str) -> x509.Certificate:
    """A self-signed CA certificate for ``key``."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, algorithm)
    )


# Two roots of each key type the CA can have; hypothesis picks among them.
ROOTS: list[x509.Certificate] = [
    make_root(key, f"{kind} root {i}")
    for i in range(2)
    for kind, key in (
        ("P-256", ec.generate_private_key(ec.SECP256R1())),
        ("P-384", ec.generate_private_key(ec.SECP384R1())),
        ("RSA", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("Ed25519", ed25519.Ed25519PrivateKey.generate()),
    )
]
EXPECTED_KTY = {"P-256": ("EC", "P-256"), "P-384": ("EC", "P-384"), "RSA": ("RSA", None)}
EXPECTED_KTY["Ed25519"] = ("OKP", "Ed25519")


def good() -> dict[str, Any]:
    """A bundle of one EC and one RSA root, as the CA serves it."""
    return SpiffeBundle((ROOTS[0], ROOTS[2]), 7, 300).to_json()


def parse(doc: object) -> SpiffeBundle:
    return SpiffeBundle.parse(json.dumps(doc))


# Building ----------------------------------------------------------------------------------
def test_each_root_is_one_x509_svid_key_with_its_own_x5c_and_key_members() -> None:
    """Every root becomes a key with use x509-svid, the kty/crv of its key, no kid, and an
    x5c of exactly that root in standard base64. Twin: the sequence and hint members."""
    doc = SpiffeBundle(tuple(ROOTS[:4]), 12, 60).to_json()
    assert doc["spiffe_sequence"] == 12
    assert doc["spiffe_refresh_hint"] == 60
    assert len(doc["keys"]) == 4
    for key, root in zip(doc["keys"], ROOTS[:4], strict=True):
        kind = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        kty, crv = EXPECTED_KTY[str(kind).split(" root")[0]]
        assert key["use"] == "x509-svid"
        assert "kid" not in key
        assert key["kty"] == kty
        assert key.get("crv") == crv
        members = {"EC": {"x", "y"}, "RSA": {"n", "e"}, "OKP": {"x"}}[kty]
        assert members <= set(key)
        assert "d" not in key
        assert key["x5c"] == [
            base64.b64encode(root.public_bytes(serialization.Encoding.DER)).decode()
        ]


def test_ec_coordinates_have_the_full_size_of_the_curve() -> None:
    """RFC 7518 6.2.1.2: ``x`` and ``y`` are the full coordinate size (32 bytes on P-256) even
    when a coordinate has leading zeros, which strict readers (go-jose, so SPIRE) require.
    600 keys make a leading zero byte all but certain. Twin: the round trip reads them."""
    short = 0
    for _ in range(600):
        key = ec.generate_private_key(ec.SECP256R1())
        numbers = key.public_key().public_numbers()
        short += numbers.x.bit_length() <= 248 or numbers.y.bit_length() <= 248
        doc = SpiffeBundle((make_root(key, "p256"),)).to_json()
        jwk = doc["keys"][0]
        for member in ("x", "y"):
            raw = base64.urlsafe_b64decode(jwk[member] + "=" * (-len(jwk[member]) % 4))
            assert len(raw) == 32
    assert short > 0  # the case that matters did occur


def test_an_empty_bundle_has_empty_keys_and_no_optional_members() -> None:
    """No roots: ``keys`` is present and empty (the spec's "distrusted"). Twin: the
    sequence and hint members are left out when they are None."""
    assert SpiffeBundle(()).to_json() == {"keys": []}
    assert SpiffeBundle((), 0, 1).to_json() == {
        "spiffe_sequence": 0,
        "spiffe_refresh_hint": 1,
        "keys": [],
    }


def test_a_sequence_beyond_64_bits_is_refused_when_built() -> None:
    """A sequence must fit 64 bits. Twin: 2**64-1 itself is accepted."""
    SpiffeBundle((), (1 << 64) - 1)
    with pytest.raises(ValueError, match="spiffe_sequence"):
        SpiffeBundle((), 1 << 64)
    with pytest.raises(ValueError, match="spiffe_sequence"):
        SpiffeBundle((), -1)


# Round trip --------------------------------------------------------------------------------
@FAST
@given(
    roots=st.lists(st.sampled_from(ROOTS), unique_by=fingerprint, max_size=len(ROOTS)),
    sequence=st.none() | st.integers(min_value=0, max_value=(1 << 64) - 1),
    hint=st.none() | st.integers(min_value=0, max_value=(1 << 63) - 1),
)
def test_build_then_parse_gives_back_roots_sequence_and_hint(
    roots: list[x509.Certificate], sequence: int | None, hint: int | None
) -> None:
    """Whatever the roots (EC P-256/P-384, RSA, Ed25519), sequence and hint, parsing the
    served bytes gives the same values, in the same order, with nothing noted. Twin: the
    refusal tests below, where a changed member does not come back."""
    built = SpiffeBundle(tuple(roots), sequence, hint)
    parsed = SpiffeBundle.parse(built.to_bytes())
    assert parsed == built
    assert parsed.notes == ()


@FAST
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_parse_of_random_input_raises_only_bad_material_error(data: bytes | str) -> None:
    """Hostile bytes give a bundle or ``BadMaterialError``, never another exception."""
    with contextlib.suppress(BadMaterialError):
        SpiffeBundle.parse(data)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=10,
)


@FAST
@given(
    members=st.dictionaries(
        st.sampled_from(["use", "kty", "crv", "x", "y", "n", "e", "x5c", "kid", "d"]),
        JSON_VALUES,
    ),
    top=st.dictionaries(st.sampled_from(["spiffe_sequence", "spiffe_refresh_hint"]), JSON_VALUES),
)
def test_parse_of_random_keys_raises_only_bad_material_error(
    members: dict[str, Any], top: dict[str, Any]
) -> None:
    """Random members in a key and beside ``keys`` give a bundle or ``BadMaterialError``."""
    doc = good()
    doc.update(top)
    doc["keys"][0].update(members)
    with contextlib.suppress(BadMaterialError):
        SpiffeBundle.from_json(doc)


# Refusals ----------------------------------------------------------------------------------
def _mismatched(doc: dict[str, Any]) -> None:
    doc["keys"][0]["x5c"] = good()["keys"][1]["x5c"]  # the RSA root under the EC key


def _url_safe(doc: dict[str, Any]) -> None:
    text = doc["keys"][0]["x5c"][0]
    assert "+" in text or "/" in text  # so that the URL-safe spelling differs
    doc["keys"][0]["x5c"][0] = text.replace("+", "-").replace("/", "_")


REFUSALS: list[tuple[str, Any, str]] = [
    ("not an object", lambda d: d.clear() or d.update({"keys": "x"}), "'keys' must be"),
    ("keys missing", lambda d: d.pop("keys"), "'keys' must be present"),
    ("keys an object", lambda d: d.update(keys={}), "'keys' must be present"),
    ("sequence negative", lambda d: d.update(spiffe_sequence=-1), "spiffe_sequence must"),
    ("sequence 2**64", lambda d: d.update(spiffe_sequence=1 << 64), "spiffe_sequence must"),
    ("sequence a string", lambda d: d.update(spiffe_sequence="7"), "spiffe_sequence must"),
    ("sequence a float", lambda d: d.update(spiffe_sequence=7.0), "spiffe_sequence must"),
    ("sequence a bool", lambda d: d.update(spiffe_sequence=True), "spiffe_sequence must"),
    ("hint negative", lambda d: d.update(spiffe_refresh_hint=-5), "spiffe_refresh_hint must"),
    ("hint a string", lambda d: d.update(spiffe_refresh_hint="5m"), "spiffe_refresh_hint must"),
    ("key not an object", lambda d: d["keys"].append("k"), r"keys\[2\]: a JWK must be"),
    ("kty missing", lambda d: d["keys"][0].pop("kty"), r"keys\[0\]: 'kty' must be present"),
    ("kty a number", lambda d: d["keys"][1].update(kty=3), r"keys\[1\]: 'kty' must be"),
    ("x5c a string", lambda d: d["keys"][0].update(x5c="MII"), r"keys\[0\]: 'x5c' must be"),
    ("x5c not base64", lambda d: d["keys"][0].update(x5c=["***"]), "not standard base64"),
    ("x5c URL-safe base64", _url_safe, "not standard base64"),
    ("x5c not DER", lambda d: d["keys"][0].update(x5c=["AAAA"]), "not a DER certificate"),
    ("x5c a number", lambda d: d["keys"][0].update(x5c=[5]), r"x5c\[0\]: must be a base64"),
    ("x5c too long", lambda d: d["keys"][0].update(x5c=["A" * 70000]), "at most"),
    ("key is not x5c's", _mismatched, r"keys\[0\]: the JWK's public key is not its cert"),
    ("point off curve", lambda d: d["keys"][0].update(x=d["keys"][1]["n"][:43]), "not a valid"),
    ("private member", lambda d: d["keys"][0].update(d="AAAA"), "holds a private key"),
    ("too many keys", lambda d: d.update(keys=[{}] * (MAX_BUNDLE_KEYS + 1)), "more than 256"),
]


@pytest.mark.parametrize(
    ("change", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_a_malformed_member_is_refused_by_name(change: Any, reason: str) -> None:
    """Each malformed member gives ``BadMaterialError`` saying which and why. Twin: the
    unchanged bundle parses (first line)."""
    assert len(parse(good()).roots) == 2
    doc = copy.deepcopy(good())
    change(doc)
    with pytest.raises(BadMaterialError, match=reason):
        parse(doc)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ("[]", "must be a JSON object"),
        ('{"keys": [], "keys": []}', "member 'keys' appears twice"),
        ('{"keys": [{"use": "x509-svid", "use": "jwt-svid"}]}', "member 'use' appears twice"),
        ("[" * 100_000, "not JSON"),
        (" " * MAX_BUNDLE_BYTES + '{"keys": []}', "more than"),
    ],
    ids=["truncated", "not utf-8", "a list", "dup keys", "dup use", "deep", "too big"],
)
def test_text_that_is_no_jwk_set_is_refused(text: str | bytes, reason: str) -> None:
    """Broken JSON, a duplicated member (which a parser would silently resolve one way or
    the other) and oversized text are refused. Twin: ``{"keys": []}`` parses."""
    assert SpiffeBundle.parse('{"keys": []}').roots == ()
    with pytest.raises(BadMaterialError, match=reason):
        SpiffeBundle.parse(text)


# What is ignored ---------------------------------------------------------------------------
def test_an_empty_keys_list_is_a_valid_bundle_meaning_distrusted() -> None:
    """``"keys": []`` parses to no roots and no notes. Twin: a bundle whose every key is
    ignored also has no roots, and says so in a note."""
    empty = SpiffeBundle.parse('{"spiffe_sequence": 9, "keys": []}')
    assert empty.roots == ()
    assert empty.sequence == 9
    assert empty.notes == ()
    doc = good()
    for key in doc["keys"]:
        key["use"] = "jwt-svid"
    ignored = parse(doc)
    assert ignored.roots == ()
    assert any("distrusted" in note for note in ignored.notes)


IGNORED: list[tuple[str, Any, str]] = [
    ("use missing", lambda k: k.pop("use"), "ignored, no use"),
    ("use jwt-svid", lambda k: k.update(use="jwt-svid"), "ignored, use 'jwt-svid'"),
    ("use in capitals", lambda k: k.update(use="X509-SVID"), "ignored, use 'X509-SVID'"),
    ("use a list", lambda k: k.update(use=["x509-svid"]), "ignored, use ['x509-svid']"),
    ("unknown kty", lambda k: k.update(kty="oct"), "unknown key type 'oct'"),
    ("unknown curve", lambda k: k.update(crv="secp256k1"), "unknown EC curve 'secp256k1'"),
    ("x5c missing", lambda k: k.pop("x5c"), "without 'x5c'"),
    ("x5c empty", lambda k: k.update(x5c=[]), "without 'x5c'"),
]


@pytest.mark.parametrize(("change", "note"), [r[1:] for r in IGNORED], ids=[r[0] for r in IGNORED])
def test_a_key_the_specification_says_to_ignore_is_ignored_and_noted(
    change: Any, note: str
) -> None:
    """The changed key is skipped with a note naming it; the other key still counts. Twin:
    untouched, both keys count and nothing is noted."""
    assert parse(good()).notes == ()
    doc = good()
    change(doc["keys"][0])
    bundle = parse(doc)
    assert [fingerprint(c) for c in bundle.roots] == [fingerprint(ROOTS[2])]
    assert len(bundle.notes) == 1
    assert "keys[0]" in bundle.notes[0]
    assert note in bundle.notes[0]


def test_certificates_after_the_first_in_x5c_are_ignored() -> None:
    """X509-SVID section 6.2: only x5c's first value is the root; the rest is ignored and
    noted. Twin: the first value alone must match the key (a swapped order is refused)."""
    doc = good()
    doc["keys"][0]["x5c"].append(doc["keys"][1]["x5c"][0])
    bundle = parse(doc)
    assert [fingerprint(c) for c in bundle.roots] == [fingerprint(ROOTS[0]), fingerprint(ROOTS[2])]
    assert "1 certificate(s) after the first" in bundle.notes[0]
    doc["keys"][0]["x5c"].reverse()
    with pytest.raises(BadMaterialError, match="not its certificate"):
        parse(doc)


def test_the_same_root_twice_counts_once() -> None:
    """A repeated key is ignored and noted. Twin: two different roots both count."""
    doc = good()
    doc["keys"].append(copy.deepcopy(doc["keys"][0]))
    bundle = parse(doc)
    assert len(bundle.roots) == 2
    assert "same root as an earlier key" in bundle.notes[0]


def test_members_the_specification_does_not_define_are_ignored() -> None:
    """Unknown members of the set and of a key (and a ``kid``) do not stop a bundle.
    Twin: a bad value in a defined member does (the refusal tests)."""
    doc = good()
    doc["spiffe_extra"] = {"a": 1}
    doc["keys"][0]["kid"] = "k1"
    doc["keys"][0]["alg"] = "ES256"
    assert len(parse(doc).roots) == 2


def test_roots_digest_depends_on_the_set_only() -> None:
    """The digest is the same whatever the order or repeats. Twin: another set differs."""
    assert roots_digest([ROOTS[0], ROOTS[1]]) == roots_digest([ROOTS[1], ROOTS[0], ROOTS[1]])
    assert roots_digest([ROOTS[0]]) != roots_digest([ROOTS[0], ROOTS[1]])


# Names -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["example.org", "td", "a-b_c.9", "x" * 255])
def test_a_trust_domain_name_is_accepted(name: str) -> None:
    """Lowercase letters, digits, '.', '-' and '_'. Twin: the next test's names."""
    assert trust_domain_problem(name) is None


@pytest.mark.parametrize("name", ["", "Example.org", "ex ample", "td:443", "x" * 256, "é.org"])
def test_a_malformed_trust_domain_name_is_refused(name: str) -> None:
    """Capitals, spaces, ports, non-ASCII and over 255 characters are refused."""
    assert trust_domain_problem(name) is not None


def test_spiffe_ids_and_their_trust_domains() -> None:
    """A SPIFFE ID gives its trust domain. Twin: another scheme, a dot segment, a port."""
    assert spiffe_id_problem("spiffe://spire.internal/spire/server") is None
    assert trust_domain_of("spiffe://spire.internal/spire/server") == "spire.internal"
    assert trust_domain_of("spiffe://td") == "td"
    for bad in ("https://td/x", "spiffe://td/a/../b", "spiffe://td:8443/x", "spiffe://TD/x"):
        assert spiffe_id_problem(bad) is not None
        with pytest.raises(ValueError, match="is not a SPIFFE ID"):
            trust_domain_of(bad)
