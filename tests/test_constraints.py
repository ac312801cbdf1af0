"""The CA's name-constraint check (``federatls.ca._constraints``), a pure function, against
hostile names: letter case, trailing dots, look-alike suffixes, IDNs, IPs posing as DNS
names, URIs with userinfo or odd ports, wildcards over excluded names, empty lists. Each
admitted case has a refused twin beside it in the same table.

The rule under test: admit a name only where OpenSSL 3.0 and Go 1.19 would both admit it
(their readings differ for URIs and emails; docs/ca.md, "Name constraints").
"""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from federatls._x509 import split_sans
from federatls.ca._constraints import (
    NameConstraints,
    constraints_refusal,
    dns_subtree,
    email_subtree,
    ip_subtree,
    permitted_subtrees,
    uri_subtree,
)


def _general(spec: str) -> x509.GeneralName:
    kind, _, value = spec.partition(":")
    if kind == "DNS":
        return x509.DNSName(value)
    if kind == "URI":
        return x509.UniformResourceIdentifier(value)
    if kind == "email":
        return x509.RFC822Name(value)
    if kind == "IP":
        return x509.IPAddress(ipaddress.ip_network(value))
    assert kind == "DirName"
    return x509.DirectoryName(x509.Name.from_rfc4514_string(value))


def constraints(
    permitted: list[str] | None = None, excluded: list[str] | None = None
) -> NameConstraints:
    value = x509.NameConstraints(
        permitted_subtrees=None if permitted is None else [_general(p) for p in permitted],
        excluded_subtrees=None if excluded is None else [_general(x) for x in excluded],
    )
    return NameConstraints.read(value, "CN=test")


def refusal(c: NameConstraints | list[NameConstraints], *sans: str, cn: str = "x") -> str | None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) if cn else x509.Name([])
    return constraints_refusal(c if isinstance(c, list) else [c], subject, split_sans(sans))


DNS = constraints(["DNS:k8s.internal"])


@pytest.mark.parametrize(
    ("name", "admitted"),
    [
        ("k8s.internal", True),
        ("a.k8s.internal", True),
        ("A.K8S.Internal", True),  # letter case does not matter (RFC 5280, OpenSSL, Go)
        ("*.k8s.internal", True),
        ("xn--bcher-kva.k8s.internal", True),  # an IDN as its A-label
        ("evilk8s.internal", False),  # a suffix, not a label boundary
        ("k8s.internal.evil.test", False),
        ("internal", False),
        ("a.k8s.internal.", False),  # trailing dot: Go cannot parse it, OpenSSL refuses it
        ("a..k8s.internal", False),
        ("bücher.k8s.internal", False),  # a U-label: not ASCII
        ("k8s-internal", False),
    ],
)
def test_dns_constraint_covers_the_name_and_below(name: str, admitted: bool) -> None:
    """A DNS constraint admits the name and every name below it, in any letter case.
    Twin: look-alikes, trailing dots, empty labels and U-labels are refused."""
    reason = refusal(DNS, name)
    assert (reason is None) == admitted, reason
    if not admitted:
        assert repr(name) in reason  # type: ignore[operator]


def test_leading_dot_dns_constraint_covers_only_names_below() -> None:
    """``.k8s.internal`` admits names below it (as OpenSSL and Go read it). Twin: the name
    itself is refused."""
    c = constraints(["DNS:.k8s.internal"])
    assert refusal(c, "a.k8s.internal") is None
    assert "outside the name constraints" in (refusal(c, "k8s.internal") or "")


def test_name_of_a_type_the_constraints_do_not_mention_passes() -> None:
    """DNS constraints say nothing about IP addresses, URIs or emails (RFC 5280). Twin: the
    same IP is refused once an IP constraint is there."""
    assert refusal(DNS, "a.k8s.internal", "10.0.0.1", "spiffe://cloud.internal/x", "a@b.c") is None
    both = constraints(["DNS:k8s.internal", "IP:192.168.0.0/16"])
    assert "IP address '10.0.0.1' is outside" in (refusal(both, "a.k8s.internal", "10.0.0.1") or "")


@pytest.mark.parametrize(
    ("cn", "admitted"),
    [
        ("a.k8s.internal", True),
        ("payments", True),  # one label: not read as a host name
        ("Payments Service", True),
        ("spiffe://k8s.internal/ns/a", True),
        ("payments.cloud.internal", False),  # OpenSSL checks it as a DNS name
        ("10.0.0.1", False),  # so does OpenSSL: digits and dots are a host name to it
        ("evil_x.cloud", False),
    ],
)
def test_host_shaped_common_name_is_checked_as_a_dns_name(cn: str, admitted: bool) -> None:
    """A common name shaped like a host name must be inside the DNS constraints even beside
    an admitted SAN. Twin: a common name of one label or with spaces is not a host name."""
    reason = refusal(DNS, "spiffe://k8s.internal/ns/a", cn=cn)
    assert (reason is None) == admitted, reason


def test_ip_constraint_and_ipv4_mapped_addresses() -> None:
    """An IP constraint admits the addresses of its network. Twin: another network, and the
    IPv4-mapped IPv6 spelling of an admitted address (Go and OpenSSL refuse it), are
    refused; an excluded network also catches the mapped spelling (Go's host-name check
    takes ``::ffff:10.1.2.3`` for 10.1.2.3)."""
    c = constraints(["IP:10.0.0.0/8"])
    assert refusal(c, "10.1.2.3") is None
    assert refusal(c, "11.0.0.1") is not None
    assert refusal(c, "::ffff:10.1.2.3") is not None
    x = constraints(excluded=["IP:10.0.0.0/8"])
    assert refusal(x, "11.0.0.1") is None
    assert "excluded" in (refusal(x, "::ffff:10.1.2.3") or "")


@pytest.mark.parametrize(
    ("uri", "admitted"),
    [
        ("spiffe://k8s.internal/ns/a", True),
        ("SPIFFE://K8S.Internal/ns/a", True),
        ("https://k8s.internal:8443/a", True),
        ("spiffe://a.k8s.internal/x", False),  # OpenSSL: host only; Go: host and below
        ("spiffe://evil@k8s.internal/x", False),  # userinfo
        ("https://k8s.internal:x@evil.test/", False),  # OpenSSL would take k8s.internal
        ("https://k8s.internal:443.evil.test/", False),  # not a port
        ("urn:k8s.internal", False),  # no authority: RFC 5280 says reject
        ("spiffe://10.0.0.1/x", False),
        ("spiffe://[::1]/x", False),
        ("spiffe://k8s%2einternal/x", False),
        ("spiffe://k8s.internal./x", False),
        ("spiffe:///x", False),
    ],
)
def test_uri_constraint_is_read_as_the_host_only(uri: str, admitted: bool) -> None:
    """A URI constraint ``k8s.internal`` admits URIs whose host is exactly that. Twin: a host
    below it (which Go would admit), userinfo, a bad port, no host or an IP host."""
    reason = refusal(constraints(["URI:k8s.internal"]), uri)
    assert (reason is None) == admitted, reason


def test_leading_dot_uri_constraint_covers_hosts_below() -> None:
    """``.k8s.internal`` admits URIs whose host is below it. Twin: the domain itself."""
    c = constraints(["URI:.k8s.internal"])
    assert refusal(c, "spiffe://a.k8s.internal/x") is None
    assert refusal(c, "spiffe://k8s.internal/x") is not None


def test_excluded_subtrees_are_read_wide() -> None:
    """A name in an excluded subtree is refused, and an excluded URI domain covers the hosts
    below it too (as Go reads it). Twin: a neighbour outside the excluded subtree passes."""
    c = constraints(
        ["DNS:k8s.internal", "URI:.k8s.internal"], ["DNS:bad.k8s.internal", "URI:bad.k8s.internal"]
    )
    assert refusal(c, "good.k8s.internal", "spiffe://good.k8s.internal/x") is None
    assert refusal(c, "notbad.k8s.internal") is None
    for name in ("bad.k8s.internal", "x.bad.k8s.internal", "spiffe://x.bad.k8s.internal/y"):
        assert "excluded" in (refusal(c, name) or ""), name


@pytest.mark.parametrize("name", ["*.k8s.internal", "*.bad.k8s.internal", "f*.k8s.internal"])
def test_wildcard_over_an_excluded_name_is_refused(name: str) -> None:
    """A wildcard that stands for a name of an excluded subtree is refused (OpenSSL and Go
    would accept ``*.k8s.internal`` beside an excluded ``bad.k8s.internal``). Twin: a
    wildcard elsewhere passes."""
    c = constraints(["DNS:k8s.internal"], ["DNS:bad.k8s.internal"])
    assert "excluded" in (refusal(c, name) or "")
    assert refusal(c, "*.good.k8s.internal") is None


@pytest.mark.parametrize(
    ("email", "admitted"),
    [
        ("a@k8s.internal", True),
        ("A@K8S.Internal", True),
        ("root@cloud.internal", True),
        ("root@CLOUD.internal", True),
        ("a@b.k8s.internal", False),  # the host form means that host only (OpenSSL)
        ("Root@cloud.internal", False),  # a mailbox's local part is compared exactly
        ("a@evilk8s.internal", False),
        ('"a b"@k8s.internal', False),  # a quoted local part is not read
    ],
)
def test_email_constraints(email: str, admitted: bool) -> None:
    """Email constraints admit a mailbox or the addresses at a host. Twin: another host, a
    host below it, another letter case of the mailbox's local part, a quoted local part."""
    c = constraints(["email:k8s.internal", "email:root@cloud.internal"])
    reason = refusal(c, email)
    assert (reason is None) == admitted, reason


def test_directory_name_constraint() -> None:
    """A directoryName constraint admits subjects that begin with it. Twin: another subject."""
    c = constraints(["DirName:CN=x"])
    assert refusal(c, "a.b", cn="x") is None
    assert "subject 'CN=y' is outside" in (refusal(c, "a.b", cn="y") or "")


def test_empty_constraint_values_and_lists() -> None:
    """An empty DNS base admits every DNS name (OpenSSL, Go and NSS agree), no permitted
    list (only an excluded one) and no constraints admit everything. Twin: an empty URI base
    admits no URI (OpenSSL reads it so) and an empty excluded URI base refuses all.
    (cryptography refuses an empty permitted list, as RFC 5280 does.)"""
    assert refusal([], "anything.test") is None
    assert refusal(constraints(excluded=["IP:10.0.0.0/8"]), "anything.test", "spiffe://x/y") is None
    assert refusal(constraints(["DNS:"]), "anything.test") is None
    assert refusal(constraints(["URI:"]), "spiffe://x/y") is not None
    assert refusal(constraints(excluded=["URI:"]), "spiffe://x/y") is not None


def test_every_certificate_above_the_leaf_counts() -> None:
    """Constraints of several CA certificates all apply. Twin: a name each admits alone."""
    both = [constraints(["DNS:internal"]), constraints(["DNS:k8s.internal"])]
    assert refusal(both, "a.k8s.internal") is None
    assert refusal(both, "a.cloud.internal") is not None


@pytest.mark.parametrize("value", ["bad name", "a!.test", "a..b", "-a.test"])
def test_a_constraint_the_ca_cannot_read_is_an_error(value: str) -> None:
    """Constraints from another tool that the CA cannot read stop it at load (ValueError),
    never skipped. Twin: a readable one loads."""
    with pytest.raises(ValueError, match="cannot read"):
        constraints([f"DNS:{value}"])
    assert constraints(["DNS:a.test"]).permitted.dns == ("a.test",)


@pytest.mark.parametrize(
    ("parse", "text", "problem"),
    [
        (dns_subtree, "", "empty"),
        (dns_subtree, "k8s.internal.", "ends with a dot"),
        (dns_subtree, "*.k8s.internal", "wildcard"),
        (dns_subtree, "bücher.test", "A-label"),
        (dns_subtree, "10.0.0.1", "--permit-ip"),
        (dns_subtree, "a b.test", "not a domain"),
        (uri_subtree, "spiffe://k8s.internal", "give its host only"),
        (ip_subtree, "10.0.0.1/8", "host bits"),
        (ip_subtree, "k8s.internal", "CIDR"),
        (email_subtree, "a b@k8s.internal", "not a mailbox"),
        (email_subtree, "a@.k8s.internal", "not a mailbox"),
    ],
)
def test_operator_values_are_checked(parse: object, text: str, problem: str) -> None:
    """A bad --permit-* value is a ValueError quoting the problem. Twin: good values parse."""
    with pytest.raises(ValueError, match=problem):
        parse(text)  # type: ignore[operator]


def test_operator_values_make_one_permitted_extension() -> None:
    """Good values become one list of permitted subtrees, lower-cased, duplicates dropped,
    no excluded ones. Twin: no values make no extension."""
    value = permitted_subtrees(
        [
            dns_subtree("K8S.internal"),
            dns_subtree("k8s.internal"),
            dns_subtree(".svc.test"),
            uri_subtree("k8s.internal"),
            ip_subtree("10.0.0.0/8"),
            email_subtree("ops@k8s.internal"),
        ]
    )
    assert value is not None
    assert value.excluded_subtrees is None
    assert [n.value for n in value.permitted_subtrees or []] == [
        "k8s.internal",
        ".svc.test",
        "k8s.internal",
        ipaddress.ip_network("10.0.0.0/8"),
        "ops@k8s.internal",
    ]
    assert permitted_subtrees([]) is None


EVERY_TYPE = constraints(
    ["DNS:k8s.internal", "URI:k8s.internal", "email:k8s.internal", "IP:10.0.0.0/8", "DirName:CN=x"],
    ["DNS:db.k8s.internal", "URI:.bad.test", "email:root@k8s.internal", "IP:10.9.0.0/16"],
)
_HOSTILE = st.text(st.sampled_from("aAk8s.-_*@:/[]%?#\\ \t\n.xn-é0\x00"), max_size=40)


@settings(max_examples=400, deadline=None, database=None)
@given(
    cn=_HOSTILE,
    names=st.lists(
        st.one_of(
            _HOSTILE,
            st.builds(lambda h, p: f"spiffe://{h}/{p}", _HOSTILE, _HOSTILE),
            st.builds(lambda h: f"{h}.k8s.internal", _HOSTILE),
        ),
        max_size=4,
    ),
)
def test_check_never_fails_on_hostile_names(cn: str, names: list[str]) -> None:
    """Whatever names a token carries, the check answers a reason or None and never raises
    (an exception would be a 500). Twin: the DNS property below admits and refuses."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) if cn else x509.Name([])
    answer = constraints_refusal([EVERY_TYPE], subject, split_sans(names))
    assert answer is None or answer


_LABELS = st.lists(
    st.sampled_from(["a", "k8s", "internal", "evil", "xn--bcher-kva", "db"]), max_size=4
)


@settings(max_examples=300, deadline=None, database=None)
@given(labels=_LABELS, upper=st.booleans())
def test_dns_verdict_is_a_label_suffix(labels: list[str], upper: bool) -> None:
    """A DNS name is admitted under ``k8s.internal`` (excluding ``db.k8s.internal``) exactly
    when its labels end with k8s, internal and do not end with db, k8s, internal, in any
    letter case. Twin: the names that do not are refused."""
    name = (
        ".".join([*labels, "k8s", "internal"]) if labels and labels[0] == "a" else ".".join(labels)
    )
    if not name:
        return
    shown = name.upper() if upper else name
    c = constraints(["DNS:k8s.internal"], ["DNS:db.k8s.internal"])
    parts = name.split(".")
    inside = parts[-2:] == ["k8s", "internal"] and not (
        len(parts) >= 3 and parts[-3:] == ["db", "k8s", "internal"]
    )
    assert (refusal(c, shown) is None) == inside, shown
