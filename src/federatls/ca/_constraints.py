"""X.509 name constraints (RFC 5280, 4.2.1.10) at the CA: the permitted subtrees
``federatls ca init --permit-*`` writes into the intermediate (each value checked here), the
constraints read back from the CA certificates above the leaves (whoever made them), and the
one check made before a leaf is signed: are all its names inside them?

Verifiers disagree at the edges (docs/ca.md, "Name constraints"): OpenSSL reads a URI
constraint ``example.com`` as that host only and Go as that host and every host below it;
OpenSSL takes the host of ``https://example.com:x@evil.test/`` to be ``example.com``. The
check admits a name only where every verifier would (a permitted subtree is read the narrow
way, an excluded one the wide way) and refuses a name verifiers may read differently.
Pure: no I/O, no clock. Not here: when to check (``Authority``), writing files (``_pki``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509

from .._x509 import SANs, common_name

__all__ = [
    "NameConstraints",
    "constraints_refusal",
    "dns_subtree",
    "email_subtree",
    "ip_subtree",
    "permitted_subtrees",
    "uri_subtree",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# A host name label: letters, digits, '_' and '-' (not first or last), at most 63.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# The leftmost label of a DNS name may hold a wildcard ("*", "f*"): it may stand for any label.
_WILDCARD_LABEL = re.compile(r"[a-z0-9_*-]{1,63}")
# A common name OpenSSL reads as a DNS name (when a leaf has no DNS name): two or more labels
# of host name characters. The CA checks such a common name as a DNS name whenever it checks
# DNS names ('*' included, which OpenSSL would skip: a display name is no excuse).
_HOST_SHAPED = re.compile(r"[A-Za-z0-9_*.-]*\.[A-Za-z0-9_*.-]*")
# An email local part: RFC 5321's dot-atom characters (no quoted strings, no second '@').
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def _labels(name: str, *, wildcard: bool = False) -> tuple[str, ...] | None:
    """The lower-case labels of an ASCII host name, or None when ``name`` is not one (an
    empty label, a trailing dot, a non-ASCII character, over 253 characters). With
    ``wildcard``, the leftmost label may hold '*'."""
    if not name or len(name) > 253 or not name.isascii():
        return None
    labels = tuple(name.lower().split("."))
    for i, label in enumerate(labels):
        pattern = _WILDCARD_LABEL if wildcard and i == 0 and "*" in label else _LABEL
        if not pattern.fullmatch(label):
            return None
    return labels


def _below(labels: tuple[str, ...], base: tuple[str, ...], *, strictly: bool) -> bool:
    """Whether ``labels`` is ``base`` with labels added on the left (at least one if
    ``strictly``)."""
    extra = len(labels) - len(base)
    return extra >= (1 if strictly else 0) and labels[extra:] == base


# Operator values (the --permit-* flags) ------------------------------------------------------
def _domain_value(text: str, flag: str) -> str:
    """A domain as a constraint names it, lower-cased: host name labels, optionally one
    leading '.'; ``ValueError`` quoting ``text`` otherwise."""
    if not text:
        raise ValueError(f"an empty {flag} would permit every name: give a domain")
    if not text.isascii():
        raise ValueError(
            f"{text!r} is not ASCII: give an internationalised domain as its A-label (xn--...)"
        )
    if "://" in text:
        raise ValueError(f"{text!r} is a URI: give its host only (a SPIFFE ID's trust domain)")
    if "*" in text:
        raise ValueError(
            f"{text!r} holds a wildcard: a constraint covers every name below the domain "
            "already (write k8s.internal, not *.k8s.internal)"
        )
    if text.endswith("."):
        raise ValueError(f"{text!r} ends with a dot: write the domain without it")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        raise ValueError(f"{text!r} is an IP address, not a domain: use --permit-ip")
    if _labels(text.removeprefix(".")) is None:
        raise ValueError(
            f"{text!r} is not a domain: labels of letters, digits, '-' and '_', "
            "none empty, at most 63 characters each and 253 in all"
        )
    return text.lower()


def dns_subtree(text: str) -> x509.DNSName:
    """A ``--permit-dns`` value: ``k8s.internal`` permits that name and every name below it
    (RFC 5280); ``.k8s.internal`` only the names below it (as OpenSSL and Go read it)."""
    return x509.DNSName(_domain_value(text, "DNS constraint"))


def uri_subtree(text: str) -> x509.UniformResourceIdentifier:
    """A ``--permit-uri-domain`` value, matched against a URI's host (RFC 5280):
    ``k8s.internal`` permits URIs whose host is exactly that (``spiffe://k8s.internal/...``),
    ``.k8s.internal`` URIs whose host is below it."""
    return x509.UniformResourceIdentifier(_domain_value(text, "URI domain constraint"))


def ip_subtree(text: str) -> x509.IPAddress:
    """A ``--permit-ip`` value: a network in CIDR notation (``10.0.0.0/8``, ``fd00::/8``);
    an address alone means that one address."""
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an IP network in CIDR notation: {exc}") from None
    return x509.IPAddress(network)


def email_subtree(text: str) -> x509.RFC822Name:
    """A ``--permit-email`` value (RFC 5280): a mailbox (``ops@k8s.internal``), every
    address at a host (``k8s.internal``) or every address at hosts below a domain
    (``.k8s.internal``)."""
    if "@" in text:
        local, _, domain = text.rpartition("@")
        if not _LOCAL_PART.fullmatch(local) or "@" in local:
            raise ValueError(f"{text!r} is not a mailbox: its local part is not a dot-atom")
        if domain.startswith("."):
            raise ValueError(f"{text!r} is not a mailbox: its domain starts with a dot")
        return x509.RFC822Name(f"{local}@{_domain_value(domain, 'email constraint')}")
    return x509.RFC822Name(_domain_value(text, "email constraint"))


def permitted_subtrees(subtrees: Iterable[x509.GeneralName]) -> x509.NameConstraints | None:
    """The extension value ``ca init`` writes: these permitted subtrees (duplicates dropped),
    no excluded ones; None for none at all."""
    unique = list(dict.fromkeys(subtrees))
    if not unique:
        return None
    return x509.NameConstraints(permitted_subtrees=unique, excluded_subtrees=None)


# Constraints read from a CA certificate ----------------------------------------------------------
@dataclass(frozen=True)
class _Bases:
    """One list of subtrees (permitted or excluded) by name type; an empty tuple is a type
    the list does not mention. Domains are lower-case; "" covers every name."""

    dns: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()
    email: tuple[str, ...] = ()
    ip: tuple[IPNetwork, ...] = ()
    dn: tuple[x509.Name, ...] = ()

    @classmethod
    def read(cls, names: Sequence[x509.GeneralName] | None, source: str) -> _Bases:
        dns: list[str] = []
        uri: list[str] = []
        email: list[str] = []
        ip: list[IPNetwork] = []
        dn: list[x509.Name] = []
        for name in names or ():
            if isinstance(name, x509.DNSName):
                dns.append(_readable_domain(name.value, "DNS", source))
            elif isinstance(name, x509.UniformResourceIdentifier):
                uri.append(_readable_domain(name.value, "URI", source))
            elif isinstance(name, x509.RFC822Name):
                local, at, domain = name.value.rpartition("@")
                if at and not _LOCAL_PART.fullmatch(local):
                    raise ValueError(
                        f"{source}: the CA cannot read email constraint {name.value!r}"
                    )
                domain = _readable_domain(domain, "email", source)
                email.append(f"{local}@{domain}" if at else domain)
            elif isinstance(name, x509.IPAddress):
                if not isinstance(name.value, IPNetwork):
                    raise ValueError(f"{source}: IP constraint {name.value} is not a network")
                ip.append(name.value)
            elif isinstance(name, x509.DirectoryName):
                dn.append(name.value)
            # otherName, registeredID: types the CA never issues, so no name of theirs to check
        return cls(tuple(dns), tuple(uri), tuple(email), tuple(ip), tuple(dn))

    def __str__(self) -> str:
        parts = [
            *(f"DNS:{d}" for d in self.dns),
            *(f"URI:{u}" for u in self.uri),
            *(f"email:{e}" for e in self.email),
            *(f"IP:{n}" for n in self.ip),
            *(f"DirName:{n.rfc4514_string()}" for n in self.dn),
        ]
        return ", ".join(parts)


def _readable_domain(value: str, kind: str, source: str) -> str:
    """A domain constraint as the check reads it, or ``ValueError``: a constraint the CA
    cannot read is not silently skipped."""
    if value and _labels(value.removeprefix(".")) is None:
        raise ValueError(f"{source}: the CA cannot read {kind} constraint {value!r}: not a domain")
    return value.lower()


@dataclass(frozen=True)
class NameConstraints:
    """The name constraints of one CA certificate (``source``: its subject), read and checked
    when the CA loads it; ``ValueError`` for one it cannot read."""

    source: str
    permitted: _Bases
    excluded: _Bases

    @classmethod
    def of(cls, certificate: x509.Certificate) -> NameConstraints | None:
        """The constraints ``certificate`` carries, or None when it carries none."""
        try:
            value = certificate.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            return None
        return cls.read(value, certificate.subject.rfc4514_string())

    @classmethod
    def read(cls, value: x509.NameConstraints, source: str) -> NameConstraints:
        """The constraints of an extension value, ``source`` naming where it is."""
        return cls(
            source,
            _Bases.read(value.permitted_subtrees, source),
            _Bases.read(value.excluded_subtrees, source),
        )


# The check ------------------------------------------------------------------------------------
def _dns_match(labels: tuple[str, ...], base: str) -> bool:
    """RFC 5280 for DNS names, as OpenSSL and Go read it: ``k8s.internal`` covers that name
    and every name below it, ``.k8s.internal`` the names below it, "" every name."""
    if not base:
        return True
    strictly = base.startswith(".")
    base_labels = _labels(base.removeprefix("."))
    return base_labels is not None and _below(labels, base_labels, strictly=strictly)


def _wildcard_reaches(labels: tuple[str, ...], base: str) -> bool:
    """Whether the wildcard name ``labels`` (``*.d``) stands for a name ``base`` covers that
    the name itself does not match: ``*.k8s.internal`` stands for ``bad.k8s.internal``."""
    if "*" not in labels[0] or base.startswith(".") or not base:
        return False
    base_labels = _labels(base)
    return base_labels is not None and base_labels[1:] == labels[1:]


def _host_match(host: tuple[str, ...], base: str, *, wide: bool) -> bool:
    """RFC 5280 for a URI's host or an email's domain: ``.d`` covers the hosts below d;
    ``d`` covers d only (OpenSSL) or, read ``wide``, d and the hosts below it (Go). An
    empty base covers nothing narrowly (OpenSSL), everything widely (Go)."""
    if not base:
        return wide
    strictly = base.startswith(".")
    base_labels = _labels(base.removeprefix("."))
    if base_labels is None:
        return False
    if strictly or wide:
        return _below(host, base_labels, strictly=strictly)
    return host == base_labels


def _uri_host(uri: str) -> tuple[tuple[str, ...] | None, str]:
    """The host labels of a URI, or None and why verifiers cannot agree on its host."""
    if not uri.isascii() or not uri.isprintable() or " " in uri:
        return None, "it holds a space, a control or a non-ASCII character"
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None, "its authority cannot be read"
    netloc = parts.netloc
    scheme_end = len(parts.scheme)
    if not parts.scheme or uri[scheme_end : scheme_end + 3] != "://" or not netloc:
        return None, "it has no host"
    if "@" in netloc:
        return None, "it has userinfo (verifiers disagree on the host of such a URI)"
    host = netloc.rsplit(":", 1)[0] if port is not None or netloc.endswith(":") else netloc
    if host.startswith("[") or _is_ip(host):
        return None, "its host is an IP address"
    labels = _labels(host)
    if labels is None:
        return None, "its host is not a host name"
    return labels, ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _mailbox(email: str) -> tuple[str, tuple[str, ...]] | None:
    local, at, domain = email.rpartition("@")
    if not at or not _LOCAL_PART.fullmatch(local):
        return None
    labels = _labels(domain)
    return None if labels is None else (local, labels)


def _email_match(mailbox: tuple[str, tuple[str, ...]], base: str, *, wide: bool) -> bool:
    """RFC 5280 for email addresses: ``user@host`` that mailbox (the local part compared
    exactly, the host without letter case), else ``base`` is a host or ``.domain``."""
    local, domain = mailbox
    if "@" in base:
        base_local, _, base_domain = base.rpartition("@")
        return local == base_local and domain == _labels(base_domain)
    return _host_match(domain, base, wide=wide)


def _ip_match(ip: IPAddress, network: IPNetwork, *, wide: bool) -> bool:
    """An address in a network of its own version; read ``wide``, an IPv4-mapped IPv6
    address also as its IPv4 address (Go matches ``::ffff:10.0.0.1`` to host 10.0.0.1)."""
    if ip.version == network.version and ip in network:
        return True
    mapped = getattr(ip, "ipv4_mapped", None)
    return wide and mapped is not None and mapped in network


def _dn_match(subject: x509.Name, base: x509.Name) -> bool:
    """The subject starts with the base's RDNs (compared exactly: RFC 4518's string
    preparation is not applied, so a spelling variant is refused, never admitted)."""
    return subject.rdns[: len(base.rdns)] == base.rdns


def _refusal(
    c: NameConstraints, kind: str, name: str, permitted: bool, excluded: str | None
) -> str | None:
    if not permitted:
        return (
            f"{kind} {name!r} is outside the name constraints of {c.source} "
            f"(permitted: {c.permitted})"
        )
    if excluded is not None:
        return (
            f"{kind} {name!r} is in a subtree excluded by the name constraints of "
            f"{c.source} ({excluded})"
        )
    return None


def _unreadable(c: NameConstraints, kind: str, name: str, why: str) -> str:
    return f"{kind} {name!r} cannot be checked against the name constraints of {c.source}: {why}"


def _check_dns(c: NameConstraints, subject: x509.Name, sans: SANs) -> str | None:
    p, x = c.permitted, c.excluded
    names = list(sans.dns)
    cn = common_name(subject)
    if _HOST_SHAPED.fullmatch(cn) and cn not in names:
        names.append(cn)
    for name in names:
        labels = _labels(name, wildcard=True)
        if labels is None:
            return _unreadable(
                c, "DNS name", name, "it is not an ASCII host name without a trailing dot"
            )
        hit = next(
            (b for b in x.dns if _dns_match(labels, b) or _wildcard_reaches(labels, b)), None
        )
        ok = not p.dns or any(_dns_match(labels, b) for b in p.dns)
        refusal = _refusal(c, "DNS name", name, ok, None if hit is None else f"DNS:{hit}")
        if refusal is not None:
            return refusal
    return None


def _check_uris(c: NameConstraints, uris: Sequence[str]) -> str | None:
    p, x = c.permitted, c.excluded
    for uri in uris:
        host, why = _uri_host(uri)
        if host is None:
            return _unreadable(c, "URI", uri, why)
        hit = next((b for b in x.uri if _host_match(host, b, wide=True)), None)
        ok = not p.uri or any(_host_match(host, b, wide=False) for b in p.uri)
        refusal = _refusal(c, "URI", uri, ok, None if hit is None else f"URI:{hit}")
        if refusal is not None:
            return refusal
    return None


def _check_emails(c: NameConstraints, emails: Sequence[str]) -> str | None:
    p, x = c.permitted, c.excluded
    for email in emails:
        mailbox = _mailbox(email)
        if mailbox is None:
            return _unreadable(
                c, "email address", email, "it is not a plain local-part@host address"
            )
        hit = next((b for b in x.email if _email_match(mailbox, b, wide=True)), None)
        ok = not p.email or any(_email_match(mailbox, b, wide=False) for b in p.email)
        refusal = _refusal(c, "email address", email, ok, None if hit is None else f"email:{hit}")
        if refusal is not None:
            return refusal
    return None


def _check_ips(c: NameConstraints, ips: Sequence[IPAddress]) -> str | None:
    p, x = c.permitted, c.excluded
    for ip in ips:
        net = next((n for n in x.ip if _ip_match(ip, n, wide=True)), None)
        ok = not p.ip or any(_ip_match(ip, n, wide=False) for n in p.ip)
        refusal = _refusal(c, "IP address", str(ip), ok, None if net is None else f"IP:{net}")
        if refusal is not None:
            return refusal
    return None


def _check_subject(c: NameConstraints, subject: x509.Name) -> str | None:
    p, x = c.permitted, c.excluded
    if not subject.rdns:  # RFC 5280: an empty subject is not checked
        return None
    hit = next((b for b in x.dn if _dn_match(subject, b)), None)
    ok = not p.dn or any(_dn_match(subject, b) for b in p.dn)
    shown = None if hit is None else f"DirName:{hit.rfc4514_string()}"
    return _refusal(c, "subject", subject.rfc4514_string(), ok, shown)


def _check_one(c: NameConstraints, subject: x509.Name, sans: SANs) -> str | None:
    """The first refusal of one certificate's constraints; only the name types they mention
    are looked at."""
    p, x = c.permitted, c.excluded
    if (p.dns or x.dns) and (refusal := _check_dns(c, subject, sans)):
        return refusal
    if (p.uri or x.uri) and (refusal := _check_uris(c, sans.uris)):
        return refusal
    if (p.email or x.email) and (refusal := _check_emails(c, sans.emails)):
        return refusal
    if (p.ip or x.ip) and (refusal := _check_ips(c, sans.ips)):
        return refusal
    if p.dn or x.dn:
        return _check_subject(c, subject)
    return None


def constraints_refusal(
    constraints: Sequence[NameConstraints], subject: x509.Name, sans: SANs
) -> str | None:
    """Why a leaf with this subject and these SANs must not be issued under CA certificates
    with these constraints, or None when every name is inside all of them.

    RFC 5280: a name of a type some permitted subtree names must match one of that type; a
    name of a type no subtree names passes; a name in an excluded subtree is refused. Also
    refused: a name verifiers may read differently (a URI with userinfo, with no host or an
    IP host; a DNS name with a trailing dot or an empty label; a non-ASCII name), a wildcard
    that stands for an excluded name, and a common name shaped like a host name outside the
    DNS constraints (OpenSSL checks it as one when the leaf has no DNS name). Not checked:
    name types the CA never issues (otherName, registeredID)."""
    for c in constraints:
        refusal = _check_one(c, subject, sans)
        if refusal is not None:
            return refusal
    return None
