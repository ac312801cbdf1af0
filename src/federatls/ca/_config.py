"""ca.json in step-ca's format (docs/ca.md, "Configuration"): load and validate it, or build
one for ``federatls ca init``. Only parsing and validation of the file's text lives here;
reading the certificates and keys it names is ``_keys.py``'s work.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._authorise import _TRUST_DOMAIN, NamePattern, _uri_problem
from .._duration import parse_go_duration
from .._errors import BadMaterialError, ConfigError
from .._jwk import PublicJWK
from ._database import Database
from ._federation import DEFAULT_REFRESH, MIN_REFRESH, FederationConfig, PeerConfig, Profile

__all__ = [
    "CAConfig",
    "CRLConfig",
    "ConnectionLimits",
    "DurationClaims",
    "JWKProvisioner",
    "split_address",
]

log = logging.getLogger("federatls.ca")

# step-ca's TLS defaults (authority/config/tls_options.go), sent as `tlsOptions`.
DEFAULT_TLS_OPTIONS: Mapping[str, Any] = {
    "cipherSuites": [
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    ],
    "minVersion": 1.2,
    "maxVersion": 1.3,
    "renegotiation": False,
}
_KNOWN_KEYS = frozenset(
    {
        "root",
        "federatedRoots",
        "crt",
        "key",
        "address",
        "insecureAddress",
        "dnsNames",
        "kms",
        "ssh",
        "logger",
        "db",
        "monitoring",
        "authority",
        "tls",
        "password",
        "templates",
        "commonName",
        "crl",
        # federatls-only blocks (step-ca ignores unknown fields)
        "federatls",
        "federation",
        "spiffe",
    }
)
_LIMIT_DURATIONS = {
    "handshakeTimeout": "handshake_timeout",
    "requestHeadTimeout": "head_timeout",
    "requestBodyTimeout": "body_timeout",
    "idleTimeout": "idle_timeout",
}
_CLAIM_DURATIONS = {
    "minTLSCertDuration": "min_tls",
    "maxTLSCertDuration": "max_tls",
    "defaultTLSCertDuration": "default_tls",
}
_CLAIM_FLAGS = {
    "disableRenewal": "disable_renewal",
    "allowRenewalAfterExpiry": "allow_renewal_after_expiry",
}


@dataclass(frozen=True)
class DurationClaims:
    """Certificate lifetime and renewal rules (step's provisioner ``claims``)."""

    min_tls: timedelta = timedelta(minutes=5)
    max_tls: timedelta = timedelta(hours=24)
    default_tls: timedelta = timedelta(hours=24)
    disable_renewal: bool = False
    allow_renewal_after_expiry: bool = False

    def merged(self, data: object, what: str) -> DurationClaims:
        """These claims overridden by the fields set in a ``claims`` object.

        As step-ca's ``Claimer``: when only ``defaultTLSCertDuration`` is set and lies outside
        the inherited bounds, the missing bound follows it. Raises ``ConfigError``.
        """
        if data is None:
            return self
        if not isinstance(data, Mapping):
            raise ConfigError(f"{what}: 'claims' must be an object")
        changes: dict[str, Any] = {}
        for key, attr in _CLAIM_DURATIONS.items():
            if data.get(key) is not None:
                changes[attr] = _duration(data[key], f"{what}.claims.{key}")
        for key, attr in _CLAIM_FLAGS.items():
            if data.get(key) is not None:
                if not isinstance(data[key], bool):
                    raise ConfigError(f"{what}.claims.{key} must be true or false")
                changes[attr] = data[key]
        out = replace(self, **changes)
        default = changes.get("default_tls")
        if default is not None and "min_tls" not in changes and default < self.min_tls:
            out = replace(out, min_tls=default)
        if default is not None and "max_tls" not in changes and default > self.max_tls:
            out = replace(out, max_tls=default)
        out._validate(what)
        return out

    def _validate(self, what: str) -> None:
        zero = timedelta(0)
        if self.min_tls <= zero or self.max_tls <= zero or self.default_tls <= zero:
            raise ConfigError(f"{what}: certificate durations must be greater than 0")
        if self.max_tls < self.min_tls:
            raise ConfigError(f"{what}: maxTLSCertDuration is less than minTLSCertDuration")
        if not self.min_tls <= self.default_tls <= self.max_tls:
            raise ConfigError(
                f"{what}: defaultTLSCertDuration must lie between the minimum and the maximum"
            )


def _duration(value: object, what: str) -> timedelta:
    if not isinstance(value, str):
        raise ConfigError(f'{what} must be a duration string such as "24h", not {value!r}')
    try:
        return parse_go_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from exc


@dataclass(frozen=True)
class ConnectionLimits:
    """What one client connection may hold (docs/ca.md, "Connection limits"): ca.json's
    ``federatls.connections`` block, a federatls-only setting that step-ca ignores.

    ``max_connections`` is None for the default, derived from the descriptor limit when the
    CA starts (``_connections.connection_limit``); the timeouts are total deadlines in
    seconds, not per read.
    """

    max_connections: int | None = None
    handshake_timeout: float = 10.0  # TCP accept to a finished TLS handshake
    head_timeout: float = 5.0  # handshake (or first byte after an answer) to a whole head
    body_timeout: float = 10.0  # whole head to whole body
    idle_timeout: float = 30.0  # an answer to the first byte of the next request

    @classmethod
    def from_json(cls, data: object, where: str) -> ConnectionLimits:
        """The ``federatls`` block of ca.json; ``ConfigError`` names a bad or unknown field."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: 'federatls' must be an object")
        unknown = sorted(set(data) - {"connections"})
        if unknown:
            raise ConfigError(f"{where}: unknown fields {unknown} in 'federatls'")
        block = data.get("connections")
        if block is None:
            return cls()
        what = f"{where}: federatls.connections"
        if not isinstance(block, Mapping):
            raise ConfigError(f"{what} must be an object")
        unknown = sorted(set(block) - {"maxConnections", *_LIMIT_DURATIONS})
        if unknown:
            raise ConfigError(f"{what}: unknown fields {unknown}")
        changes: dict[str, Any] = {}
        limit = block.get("maxConnections")
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ConfigError(
                    f"{what}.maxConnections must be a positive integer, not {limit!r}"
                )
            changes["max_connections"] = limit
        for key, attr in _LIMIT_DURATIONS.items():
            if block.get(key) is not None:
                seconds = _duration(block[key], f"{what}.{key}").total_seconds()
                if seconds <= 0:
                    raise ConfigError(f"{what}.{key} must be greater than 0")
                changes[attr] = seconds
        return replace(cls(), **changes)


@dataclass(frozen=True)
class CRLConfig:
    """ca.json's ``crl`` block, as step-ca 0.23+ reads it (authority/config: ``enabled``,
    ``generateOnRevoke``, ``cacheDuration``, ``renewPeriod``, ``idpURL`` (0.24+)); docs/protocol.md,
    "CRL". ``cache_duration`` is the CRL's lifetime (nextUpdate - thisUpdate): absent or 0
    means 24h, as step-ca makes it when the authority starts."""

    enabled: bool = False
    generate_on_revoke: bool = False
    cache_duration: timedelta = timedelta(hours=24)
    renew_period: timedelta | None = None  # None or 0: two thirds of cache_duration
    idp_url: str = ""  # the issuing distribution point; "" for https://<dnsNames[0]>/1.0/crl

    @property
    def renew_after(self) -> timedelta:
        """How old a CRL may be before a new one is made (step-ca's ticker)."""
        if self.renew_period:
            return self.renew_period
        return self.cache_duration / 3 * 2

    @classmethod
    def from_json(cls, value: object, where: str) -> CRLConfig | None:
        """The block, or None when ca.json has none; ``ConfigError`` with step-ca's messages
        for a negative duration and for a renewPeriod longer than the cacheDuration."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ConfigError(f'{where}: crl must be an object such as {{"enabled": true}}')
        unknown = sorted(set(value) - {*_CRL_FLAGS, "cacheDuration", "renewPeriod", "idpURL"})
        if unknown:
            log.warning("%s: ignoring unknown fields %s in 'crl'", where, unknown)
        flags: dict[str, bool] = {}
        for key, attr in _CRL_FLAGS.items():
            flag = value.get(key, False)
            if not isinstance(flag, bool):
                raise ConfigError(f"{where}: crl.{key} must be true or false")
            flags[attr] = flag
        cache, renew = (
            None if value.get(k) is None else _duration(value[k], f"{where}: crl.{k}")
            for k in ("cacheDuration", "renewPeriod")
        )
        if cache is None and flags["enabled"]:
            cache = cls.cache_duration  # step-ca sets the default before it validates
        zero = timedelta(0)
        if cache is not None and cache < zero:
            raise ConfigError(f"{where}: crl.cacheDuration must be greater than or equal to 0")
        if renew is not None and renew < zero:
            raise ConfigError(f"{where}: crl.renewPeriod must be greater than or equal to 0")
        if renew is not None and cache is not None and renew > cache:
            raise ConfigError(
                f"{where}: crl.cacheDuration must be greater than or equal to crl.renewPeriod"
            )
        idp = value.get("idpURL", "")
        if not isinstance(idp, str):
            raise ConfigError(f"{where}: crl.idpURL must be a string (a URL)")
        return cls(
            enabled=flags["enabled"],
            generate_on_revoke=flags["generate_on_revoke"],
            cache_duration=cache or cls.cache_duration,
            renew_period=renew or None,
            idp_url=idp,
        )


_CRL_FLAGS = {"enabled": "enabled", "generateOnRevoke": "generate_on_revoke"}


@dataclass(frozen=True)
class JWKProvisioner:
    """A JWK provisioner: its name, public key, password-protected private key and claims."""

    name: str
    key: PublicJWK
    encrypted_key: str
    claims: DurationClaims
    raw: Mapping[str, Any]  # as in ca.json: what /provisioners serves

    @property
    def id(self) -> str:
        """step's provisioner id for tokens: ``<name>:<kid>``."""
        return f"{self.name}:{self.key.kid}"


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) into host and port; ``ConfigError`` if malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"address {address!r} must be HOST:PORT, for example 127.0.0.1:9000")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port_text)


@dataclass(frozen=True)
class CAConfig:
    """A parsed, validated ca.json. Paths are as written (relative ones are taken from the
    working directory, as step-ca does)."""

    path: Path
    roots: tuple[Path, ...]
    federated_roots: tuple[Path, ...]
    crt: Path
    key: Path
    address: str
    dns_names: tuple[str, ...]
    provisioners: tuple[JWKProvisioner, ...]
    backdate: timedelta
    disable_issued_at_check: bool
    tls_options: Mapping[str, Any]
    raw: Mapping[str, Any]
    database: Database  # from the `db` block: PostgreSQL, or the SQLite file beside ca.json
    limits: ConnectionLimits = ConnectionLimits()
    federation: FederationConfig = field(default_factory=FederationConfig)  # peers by URL
    spiffe_trust_domain: str | None = None  # the `spiffe` block's trustDomain
    crl: CRLConfig | None = None  # the `crl` block (step-ca 0.23+), None when absent

    @property
    def store_path(self) -> Path:
        """The embedded store's SQLite file beside ca.json (whatever ``database`` says)."""
        return self.path.parent / "federatls.db"

    @classmethod
    def load(cls, path: Path | str) -> CAConfig:
        """Read and validate a ca.json; ``ConfigError`` names the file and the field."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read CA configuration {path}: {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: object, path: Path) -> CAConfig:
        where = str(path)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: the configuration must be a JSON object")
        unknown = sorted(set(data) - _KNOWN_KEYS)
        if unknown:
            log.warning("%s: ignoring unknown fields %s (step-ca ignores them too)", where, unknown)
        if data.get("kms") or data.get("ssh"):
            raise ConfigError(f"{where}: 'kms' and 'ssh' are not supported by the federatls CA")
        roots = _paths(data.get("root"), f"{where}: root", allow_single=True)
        if not roots:
            raise ConfigError(f"{where}: 'root' must name at least one root certificate")
        federated = _paths(data.get("federatedRoots"), f"{where}: federatedRoots")
        crt = _path(data.get("crt"), f"{where}: crt")
        key = _path(data.get("key"), f"{where}: key")
        address = data.get("address")
        if not isinstance(address, str):
            raise ConfigError(f"{where}: 'address' must be a string such as \"127.0.0.1:9000\"")
        split_address(address)
        dns = data.get("dnsNames")
        if not isinstance(dns, list) or not dns or not all(isinstance(d, str) and d for d in dns):
            raise ConfigError(f"{where}: 'dnsNames' must be a non-empty list of names")
        authority = data.get("authority")
        if not isinstance(authority, Mapping):
            raise ConfigError(f"{where}: 'authority' must be an object")
        global_claims = DurationClaims().merged(authority.get("claims"), f"{where}: authority")
        provisioners = _provisioners(authority.get("provisioners"), global_claims, where)
        backdate = timedelta(minutes=1)
        if authority.get("backdate") is not None:
            backdate = _duration(authority["backdate"], f"{where}: authority.backdate")
            if backdate < timedelta(0):
                raise ConfigError(f"{where}: authority.backdate cannot be negative")
        disable_iat = authority.get("disableIssuedAtCheck", False)
        if not isinstance(disable_iat, bool):
            raise ConfigError(f"{where}: authority.disableIssuedAtCheck must be true or false")
        return cls(
            path=path,
            roots=roots,
            federated_roots=federated,
            crt=crt,
            key=key,
            address=address,
            dns_names=tuple(dns),
            provisioners=provisioners,
            backdate=backdate,
            disable_issued_at_check=disable_iat,
            tls_options=_tls_options(data.get("tls"), where),
            raw=data,
            database=_database(data.get("db"), path, where),
            limits=ConnectionLimits.from_json(data.get("federatls"), where),
            federation=_federation(data.get("federation"), path, where),
            spiffe_trust_domain=_spiffe(data.get("spiffe"), where),
            crl=CRLConfig.from_json(data.get("crl"), where),
        )

    @property
    def audience_hosts(self) -> tuple[str, ...]:
        """Host names a token's audience may carry (dnsNames, IPv6 in brackets)."""
        return tuple(_url_host(name) for name in self.dns_names)


def _url_host(name: str) -> str:
    try:
        if ipaddress.ip_address(name).version == 6:
            return f"[{name}]"
    except ValueError:
        pass
    return name


def _path(value: object, what: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be the path of a PEM file")
    return Path(value)


def _paths(value: object, what: str, *, allow_single: bool = False) -> tuple[Path, ...]:
    if value is None:
        return ()
    if allow_single and isinstance(value, str):
        return (_path(value, what),)
    if not isinstance(value, list):
        raise ConfigError(f"{what} must be a list of paths")
    return tuple(_path(v, f"{what}[{i}]") for i, v in enumerate(value))


def _provisioners(
    value: object, global_claims: DurationClaims, where: str
) -> tuple[JWKProvisioner, ...]:
    if value is None:
        value = []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: authority.provisioners must be a list")
    out: list[JWKProvisioner] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        what = f"{where}: authority.provisioners[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{what} must be an object")
        kind = item.get("type")
        if not isinstance(kind, str) or kind.upper() != "JWK":
            raise ConfigError(f"{what}: provisioner type {kind!r} is not supported (only JWK)")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{what}: 'name' cannot be empty")
        try:
            key = PublicJWK.from_dict(item.get("key"), f"{what}.key")  # type: ignore[arg-type]
        except BadMaterialError as exc:
            raise ConfigError(str(exc)) from exc
        encrypted = item.get("encryptedKey") or ""
        if not isinstance(encrypted, str):
            raise ConfigError(f"{what}: 'encryptedKey' must be a compact JWE string")
        claims = global_claims.merged(item.get("claims"), what)
        prov = JWKProvisioner(name, key, encrypted, claims, item)
        if prov.id in seen:
            raise ConfigError(f"{what}: provisioner {prov.id} is listed twice")
        seen.add(prov.id)
        out.append(prov)
    return tuple(out)


def _database(value: object, path: Path, where: str) -> Database:
    """ca.json's ``db`` block as step-ca reads it: type ``postgresql`` is PostgreSQL at
    ``dataSource``, in the database ``database`` names if set (step-ca 0.19's driver,
    smallstep/nosql 0.4: an explicit name replaces the one in the URL; with neither,
    PostgreSQL's default, the user's name). Any other type (badgerv2, none, absent) keeps
    the embedded SQLite file beside ca.json."""
    sqlite = Database("sqlite", str(path.parent / "federatls.db"))
    if value is None:
        return sqlite
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: 'db' must be an object")
    kind = value.get("type")
    if not isinstance(kind, str) or kind.lower() != "postgresql":
        return sqlite
    source = value.get("dataSource")
    if not isinstance(source, str) or not source:
        raise ConfigError(
            f'{where}: db.dataSource must be a URL such as "postgresql://USER:PASSWORD@HOST:5432/"'
        )
    name = value.get("database")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}: db.database must be a string (the database's name)")
    return Database.postgresql(source, name or None, what=f"{where}: db.dataSource")


_PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PROFILES: tuple[Profile, ...] = ("step", "https_spiffe", "https_web")
# The fields each profile takes (docs/ca.md, "Following federation peers"); any other is
# refused, so that a field meant for another profile is not silently ignored.
_ANY_PEER = ("name", "profile", "url", "names", "refresh")
_PEER_FIELDS: dict[str, frozenset[str]] = {
    "step": frozenset({*_ANY_PEER, "fingerprint"}),
    "https_spiffe": frozenset({*_ANY_PEER, "trustDomain", "endpointSpiffeId", "bundle"}),
    "https_web": frozenset({*_ANY_PEER, "trustDomain"}),
}


def _federation(value: object, path: Path, where: str) -> FederationConfig:
    """ca.json's ``federation`` block (a federatls-only block that step-ca ignores); every
    field checked, an unknown one refused; ConfigError names the field."""
    if value is None:
        return FederationConfig()
    what = f"{where}: federation"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must be an object")
    unknown = sorted(set(value) - {"refresh", "peers"})
    if unknown:
        raise ConfigError(f"{what}: unknown fields {unknown}")
    refresh = DEFAULT_REFRESH
    if value.get("refresh") is not None:
        refresh = _refresh(value["refresh"], f"{what}.refresh")
    peers = value.get("peers", [])
    if not isinstance(peers, list):
        raise ConfigError(f"{what}.peers must be a list of peers")
    out: list[PeerConfig] = []
    seen: set[str] = set()
    for i, item in enumerate(peers):
        peer = _peer(item, path, f"{what}.peers[{i}]")
        if peer.name in seen:
            raise ConfigError(f"{what}.peers[{i}]: peer name {peer.name!r} is listed twice")
        seen.add(peer.name)
        out.append(peer)
    return FederationConfig(refresh=refresh, peers=tuple(out))


def _refresh(value: object, what: str) -> timedelta:
    interval = _duration(value, what)
    if interval < MIN_REFRESH:
        raise ConfigError(f"{what} must be at least 1s, not {value!r}")
    return interval


def _peer(item: object, path: Path, what: str) -> PeerConfig:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{what} must be an object")
    profile = item.get("profile", "step")
    if profile not in _PROFILES:
        raise ConfigError(f"{what}.profile must be one of {', '.join(_PROFILES)}, not {profile!r}")
    unknown = sorted(set(item) - _PEER_FIELDS[profile])
    if unknown:
        raise ConfigError(f"{what}: unknown fields {unknown} for profile {profile!r}")
    name = item.get("name")
    if not isinstance(name, str) or not _PEER_NAME.fullmatch(name):
        raise ConfigError(
            f"{what}.name must be 1 to 64 letters, digits, '.', '_' or '-' (starting with a "
            f"letter or digit), not {name!r}"
        )
    what = f"{what} ({name})"
    url = _peer_url(item.get("url"), profile, f"{what}.url")
    names = item.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"{what}.names must be a non-empty list of the names this peer may vouch for, "
            'such as ["*.k8s.internal", "spiffe://k8s.internal/*"]'
        )
    for n in names:
        try:
            NamePattern.parse(n)
        except ValueError as exc:
            raise ConfigError(f"{what}.names: {exc}") from exc
    refresh = None
    if item.get("refresh") is not None:
        refresh = _refresh(item["refresh"], f"{what}.refresh")
    fingerprint = trust_domain = endpoint = None
    bundle = None
    if profile == "step":
        fp = item.get("fingerprint")
        fingerprint = fp.lower().replace(":", "").replace("-", "") if isinstance(fp, str) else ""
        if not _HEX64.fullmatch(fingerprint):
            raise ConfigError(
                f"{what}.fingerprint must be the SHA-256 of one of the peer's roots, 64 hex "
                f"digits (`step certificate fingerprint root_ca.crt`), not {fp!r}"
            )
    else:
        trust_domain = _trust_domain(item.get("trustDomain"), f"{what}.trustDomain")
    if profile == "https_spiffe":
        endpoint = item.get("endpointSpiffeId")
        problem = _spiffe_id_problem(endpoint)
        if problem:
            raise ConfigError(
                f"{what}.endpointSpiffeId must be the SPIFFE ID of the bundle endpoint server, "
                f"such as spiffe://{trust_domain}/spire/server; {endpoint!r}: {problem}"
            )
        raw_bundle = item.get("bundle")
        if not isinstance(raw_bundle, str) or not raw_bundle:
            raise ConfigError(
                f"{what}.bundle must be the path of the peer's initial SPIFFE bundle (JSON)"
            )
        bundle = Path(raw_bundle)
        if not bundle.is_absolute():
            bundle = path.parent / bundle
    return PeerConfig(
        name=name,
        profile=profile,
        url=url,
        names=tuple(names),
        refresh=refresh,
        fingerprint=fingerprint,
        trust_domain=trust_domain,
        endpoint_spiffe_id=endpoint,
        bundle=bundle,
    )


def _spiffe_id_problem(value: object) -> str | None:
    """Why ``value`` is not a workload's SPIFFE ID (``spiffe://TD/PATH``), or None."""
    if not isinstance(value, str):
        return "it must be a string"
    if not value.startswith("spiffe://"):
        return "it must start with spiffe://"
    problem = _uri_problem(value)
    if problem is None and "/" not in value.removeprefix("spiffe://"):
        return "it must have a path (the bundle endpoint server's workload)"
    return problem


def _peer_url(value: object, profile: str, what: str) -> str:
    """An https:// URL with a host (the step profile's: the CA's base, no path)."""
    example = "https://ca.example:9000" if profile == "step" else "https://host:8443/bundle"
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be an https:// URL such as {example}, not {value!r}")
    if any(c.isspace() or not c.isprintable() for c in value):
        # urlsplit keeps (or quietly drops) them; the URL is logged and shown by `ca peers`.
        raise ConfigError(f"{what} {value!r} must have no spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{what} {value!r} is not a URL: {exc}") from exc
    if parts.scheme != "https" or not parts.hostname or port == 0:
        raise ConfigError(f"{what} must be an https:// URL such as {example}, not {value!r}")
    if parts.username is not None or "#" in value:  # an empty fragment too
        raise ConfigError(f"{what} {value!r} must have no user name and no fragment")
    if profile == "step" and (parts.path not in ("", "/") or "?" in value):
        raise ConfigError(
            f"{what} {value!r} must be the CA's base URL (no path): /roots is fetched below it"
        )
    return value.rstrip("/") if profile == "step" else value


def _trust_domain(value: object, what: str) -> str:
    if not isinstance(value, str) or not _TRUST_DOMAIN.fullmatch(value):
        raise ConfigError(
            f"{what} must be a SPIFFE trust domain name (1 to 255 lowercase letters, digits, "
            f"'.', '-' or '_', no scheme), such as cloud.internal, not {value!r}"
        )
    return value


def _spiffe(value: object, where: str) -> str | None:
    """ca.json's ``spiffe`` block: ``{"trustDomain": "..."}`` (federatls-only)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f'{where}: spiffe must be an object such as {{"trustDomain": ...}}')
    unknown = sorted(set(value) - {"trustDomain"})
    if unknown:
        raise ConfigError(f"{where}: spiffe: unknown fields {unknown}")
    return _trust_domain(value.get("trustDomain"), f"{where}: spiffe.trustDomain")


def _tls_options(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return DEFAULT_TLS_OPTIONS
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: 'tls' must be an object")
    out = dict(DEFAULT_TLS_OPTIONS)
    for key in ("cipherSuites", "minVersion", "maxVersion"):
        if value.get(key):
            out[key] = value[key]
    out["renegotiation"] = bool(value.get("renegotiation", False))
    for key in ("minVersion", "maxVersion"):
        if out[key] not in (1.0, 1.1, 1.2, 1.3):
            raise ConfigError(f"{where}: tls.{key} must be one of 1.0, 1.1, 1.2, 1.3")
    if not isinstance(out["cipherSuites"], list):
        raise ConfigError(f"{where}: tls.cipherSuites must be a list of names")
    return out


def build_ca_json(
    *,
    roots: Sequence[Path],
    crt: Path,
    key: Path,
    address: str,
    dns_names: Sequence[str],
    provisioner: Mapping[str, Any],
    db_dir: Path,
    federated_roots: Sequence[Path] = (),
) -> dict[str, Any]:
    """A ca.json that both the federatls CA and the real step-ca run.

    ``db`` is badgerv2 in ``db_dir`` so that step-ca persists revocations; the federatls CA
    keeps its own state in ``federatls.db`` beside the file and leaves ``db_dir`` alone.
    """
    return {
        "root": str(roots[0]) if len(roots) == 1 else [str(r) for r in roots],
        "federatedRoots": [str(r) for r in federated_roots],
        "crt": str(crt),
        "key": str(key),
        "address": address,
        "insecureAddress": "",
        "dnsNames": list(dns_names),
        "logger": {"format": "text"},
        "db": {"type": "badgerv2", "dataSource": str(db_dir), "badgerFileLoadingMode": ""},
        "authority": {"provisioners": [dict(provisioner)]},
        "tls": dict(DEFAULT_TLS_OPTIONS),
    }
