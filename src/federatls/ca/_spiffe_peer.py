"""Fetching a SPIFFE peer's bundle: the two profiles of the SPIFFE Federation specification
(section 5.2), ``https_web`` (the endpoint authenticated by Web PKI: the system's trust store,
hostname checked) and ``https_spiffe`` (the endpoint's X509-SVID, its one URI SAN exactly the
configured ``endpointSpiffeId``, verified against the peer trust domain's bundle), the
bounds of a bundle's refresh hint (``hint_interval``) and the check of its trust domain
(``foreign_trust_domains``). Parsing the bundle is ``_spiffe``'s; polling, state and ordering
by ``spiffe_sequence`` are the follower's (``_follower``).
docs/spiffe.md states these rules for operators.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from datetime import timedelta

import anyio
import httpcore
import httpx
from cryptography import x509

from .._errors import BadMaterialError, PeerFetchError
from .._netstream import Check, closing_transport
from .._spiffe import MAX_BUNDLE_BYTES, SpiffeBundle, trust_domain_of
from .._sslkeys import tls_context
from .._version import __version__
from ._federation import Fetched, PeerConfig

__all__ = [
    "MAX_HINT",
    "MIN_HINT",
    "fetch_spiffe_peer",
    "foreign_trust_domains",
    "hint_interval",
]

log = logging.getLogger("federatls.ca.federation")

# A peer's spiffe_refresh_hint is followed within these bounds: never polled more than once
# a second, nor less than once an hour (so a key the peer redacts is dropped within the hour,
# whatever it hints; the specification lets a consumer poll more often than hinted).
MIN_HINT = timedelta(seconds=1)
MAX_HINT = timedelta(hours=1)
_HEADERS = {
    "User-Agent": f"federatls/{__version__}",
    "Accept": "application/json",
    "Accept-Encoding": "identity",
}


def hint_interval(seconds: int | None) -> timedelta | None:
    """A bundle's ``spiffe_refresh_hint`` as the interval the follower polls at, within
    ``MIN_HINT`` and ``MAX_HINT``; None when the bundle gives none."""
    if seconds is None:
        return None
    return min(max(timedelta(seconds=min(seconds, 10**9)), MIN_HINT), MAX_HINT)


def foreign_trust_domains(roots: Iterable[x509.Certificate], trust_domain: str) -> list[str]:
    """The trust domains other than ``trust_domain`` that ``roots`` name in SPIFFE ID URI
    SANs (a SPIFFE root may carry ``spiffe://<its trust domain>``): a bundle says nothing of
    its trust domain itself, so this is the one claim of its own it can contradict."""
    found: list[str] = []
    for root in roots:
        try:
            sans = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
            if not uri.lower().startswith("spiffe://"):
                continue
            try:
                domain = trust_domain_of(uri)
            except ValueError:
                domain = uri  # malformed: not this trust domain's either
            if domain != trust_domain and domain not in found:
                found.append(domain)
    return found


def _svid_problem(leaf: x509.Certificate, expected: str) -> str | None:
    """Why ``leaf`` is not an X509-SVID for exactly ``expected``, or None (X509-SVID
    specification, sections 2 and 4.1: one URI name, and a leaf is not a CA)."""
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "its certificate is a CA certificate, not an X509-SVID leaf"
    except x509.ExtensionNotFound:
        pass
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return f"its certificate has no SPIFFE ID (expected {expected!r})"
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return f"its certificate has {len(uris)} URI names, an X509-SVID has exactly one"
    if uris[0] != expected:
        return f"it presented the SPIFFE ID {uris[0]!r}, not {expected!r}"
    return None


async def _initial_bundle(peer: PeerConfig) -> tuple[x509.Certificate, ...]:
    """The roots of the peer's configured ``bundle`` file (a SPIFFE bundle)."""
    path = peer.bundle
    if path is None:
        raise PeerFetchError(peer.name, "no initial bundle is configured (bundle)")

    def read() -> bytes:
        with path.open("rb") as f:
            return f.read(MAX_BUNDLE_BYTES + 1)

    try:
        raw = await anyio.to_thread.run_sync(read)
        bundle = SpiffeBundle.parse(raw, f"initial bundle {str(path)!r}")
    except OSError as exc:
        raise PeerFetchError(peer.name, f"cannot read its initial bundle: {exc}") from exc
    except BadMaterialError as exc:
        raise PeerFetchError(peer.name, str(exc)) from exc
    return bundle.roots


async def _context(peer: PeerConfig, trusted: tuple[x509.Certificate, ...]) -> ssl.SSLContext:
    if peer.profile == "https_web":
        # The system's trust store (OpenSSL's default paths; SSL_CERT_FILE and SSL_CERT_DIR
        # replace them), hostname checked: what a browser does.
        ctx = ssl.create_default_context()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx
    if peer.profile != "https_spiffe" or peer.endpoint_spiffe_id is None:
        raise PeerFetchError(peer.name, f"profile {peer.profile!r} is not a SPIFFE profile")
    # Self-serving (the endpoint is in the trust domain it serves): the latest bundle fetched,
    # the configured one at first contact. Otherwise the configured bundle is the endpoint
    # trust domain's, and always used (SPIFFE Federation, section 5.2.2.4).
    self_serving = trust_domain_of(peer.endpoint_spiffe_id) == peer.trust_domain
    anchors = trusted if self_serving and trusted else await _initial_bundle(peer)
    if not anchors:
        raise PeerFetchError(peer.name, "no root to authenticate its endpoint with")
    ctx = tls_context(ssl.PROTOCOL_TLS_CLIENT, roots=anchors)
    ctx.check_hostname = False  # the endpoint is named by its SPIFFE ID, checked below
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _svid_check(peer: PeerConfig) -> Check | None:
    """For https_spiffe: the check of the endpoint's X509-SVID, run right after the TLS
    handshake, before the request is sent."""
    expected = peer.endpoint_spiffe_id
    if peer.profile != "https_spiffe" or expected is None:
        return None

    def check(stream: httpcore.AsyncNetworkStream) -> None:
        der = stream.get_extra_info("ssl_object").getpeercert(binary_form=True)
        problem = _svid_problem(x509.load_der_x509_certificate(der), expected)
        if problem:
            raise PeerFetchError(peer.name, f"endpoint {peer.url} is not authenticated: {problem}")

    return check


async def _get(peer: PeerConfig, ctx: ssl.SSLContext, timeout: float) -> bytes:
    """The body of a GET of the peer's URL: status 200, at most ``MAX_BUNDLE_BYTES``, from an
    endpoint whose certificate is an X509-SVID for ``endpoint_spiffe_id`` (https_spiffe,
    checked before the request is sent)."""
    async with (
        httpx.AsyncClient(
            transport=closing_transport(ctx, _svid_check(peer)),
            trust_env=False,
            follow_redirects=False,
            timeout=timeout,
        ) as client,
        client.stream("GET", peer.url, headers=_HEADERS) as response,
    ):
        if response.status_code != 200:
            raise PeerFetchError(peer.name, f"{peer.url} answered {response.status_code}")
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > MAX_BUNDLE_BYTES:
                raise PeerFetchError(peer.name, f"its bundle is over {MAX_BUNDLE_BYTES} bytes")
        return bytes(body)


# What the last bundle of each peer (name, URL) had ignored: logged when it changes, not at
# every poll (a SPIRE bundle carries JWT-SVID keys as a rule).
_NOTED: dict[tuple[str, str], tuple[str, ...]] = {}


def _log_notes(peer: PeerConfig, notes: tuple[str, ...]) -> None:
    key = (peer.name, peer.url)
    if _NOTED.get(key, ()) == notes:
        return
    _NOTED[key] = notes
    for note in notes:
        log.info("federation peer %r: %s", peer.name, note)


def _verification_failure(exc: BaseException) -> str | None:
    """Why the endpoint's certificate was refused, if that is what ``exc`` (httpx's error,
    raised from httpcore's, raised from ssl's) comes from."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message)
        seen = seen.__cause__ or seen.__context__
    return None


async def fetch_spiffe_peer(
    peer: PeerConfig, trusted: tuple[x509.Certificate, ...], timeout: float
) -> Fetched:
    """One fetch of a SPIFFE bundle endpoint (profile ``https_web`` or ``https_spiffe``),
    over within ``timeout`` seconds: its roots (empty: ``"keys": []``, the trust domain is
    distrusted), ``spiffe_sequence`` and the refresh hint (``hint_interval``). What the bundle
    has that is ignored (other uses, unknown key types) is logged at INFO, once while it
    stays the same.

    ``PeerFetchError`` says why nothing may be trusted from it this time: unreachable, not
    authenticated, not a 200, a malformed bundle, or roots naming another trust domain.
    Redirects are not followed (an error): the endpoint is the configured URL."""
    try:
        with anyio.fail_after(timeout):
            body = await _get(peer, await _context(peer, trusted), timeout)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise PeerFetchError(peer.name, f"no complete answer within {timeout:g} s") from exc
    except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
        refused = _verification_failure(exc)
        reason = f"not authenticated: {refused}" if refused else str(exc) or type(exc).__name__
        raise PeerFetchError(peer.name, f"cannot fetch {peer.url}: {reason}") from exc
    try:
        bundle = SpiffeBundle.parse(body, f"bundle of {peer.url}")
    except BadMaterialError as exc:
        raise PeerFetchError(peer.name, str(exc)) from exc
    _log_notes(peer, bundle.notes)
    if peer.trust_domain is not None:
        foreign = foreign_trust_domains(bundle.roots, peer.trust_domain)
        if foreign:
            raise PeerFetchError(
                peer.name,
                f"its bundle has roots of trust domain(s) {foreign}, not {peer.trust_domain!r}",
            )
    return Fetched(bundle.roots, bundle.sequence, hint_interval(bundle.refresh_hint))
