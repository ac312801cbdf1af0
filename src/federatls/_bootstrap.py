"""``bootstrap(token)``: from a step-style one-time token to a ready identity.

The token carries the CA URL (``aud``) and the root fingerprint (``sha``). The root is
fetched without TLS verification and must have that fingerprint, else nothing more is sent;
from then on the CA is reached pinned to that root. A key is made in memory, its CSR signed,
and the CA's own roots and federation bundle fetched. All of it is over within ``timeout``,
and what the CA issued is checked (``_issuance``) before an identity is built from it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509

from ._client import DEFAULT_TIMEOUT, CAClient, Deadline, fetch_root
from ._errors import BadMaterialError, CARefusedError, TokenError
from ._identity import Identity
from ._issuance import check_issued, complete_chain, needs_completing
from ._keys import KeyType, PrivateKey, build_csr, new_private_key
from ._protocol import SignRequest, TimeDuration
from ._sync import run_sync
from ._token import LEEWAY, Token
from ._trust import TrustBundle
from ._x509 import common_name, fingerprint, split_sans

__all__ = ["bootstrap", "bootstrap_sync", "completed_chain", "sign_checked"]

log = logging.getLogger("federatls")
_REFUSAL_HINT = (
    "the CA refused the token: it was already used, has expired, was issued "
    "before the CA started, or does not come from one of its provisioners"
)


def _read_token(token: str, now: datetime) -> tuple[Token, str, str]:
    parsed = Token.parse(token)
    ca_url = parsed.ca_url()
    sha = parsed.root_fingerprint
    if sha is None:
        raise TokenError("the token has no 'sha' claim: the CA's root cannot be pinned")
    if not parsed.subject:
        raise TokenError("the token has no subject ('sub')")
    exp = parsed.expires_at
    if exp is not None and now.timestamp() - LEEWAY.total_seconds() > exp:
        when = datetime.fromtimestamp(exp, UTC).isoformat()
        raise TokenError(f"the token expired at {when}: ask for a new one")
    return parsed, ca_url, sha


async def completed_chain(
    ca: CAClient, chain: Sequence[x509.Certificate], roots: TrustBundle
) -> tuple[x509.Certificate, ...]:
    """``chain`` (a sign, renew or rekey answer) completed from the CA's ``/intermediates``
    when it lacks the intermediate its leaf needs to reach ``roots`` (a short ``certChain``);
    as it was when it lacks nothing, or when the CA publishes no intermediates (404 or 501:
    step-ca before 0.27.3) or none that fits: the checks that follow then refuse it."""
    if not needs_completing(chain, roots):
        return tuple(chain)
    published = await ca.intermediates()
    if published is None:
        log.debug("%s: the chain it sent lacks a link, and it publishes no intermediates", ca.url)
        return tuple(chain)
    completed = complete_chain(chain, published, roots)
    if completed != tuple(chain):
        log.info(
            "%s: the chain it sent lacked a link to its roots: completed from %d published "
            "intermediate(s)",
            ca.url,
            len(published),
        )
    return completed


async def sign_checked(
    ca: CAClient,
    request: SignRequest,
    *,
    key: PrivateKey,
    names: Sequence[str],
    pinned: x509.Certificate,
) -> tuple[tuple[x509.Certificate, ...], tuple[x509.Certificate, ...]]:
    """Have ``ca`` (reached pinned to ``pinned``) sign ``request`` (a CSR of ``key`` for
    ``names``), fetch its own roots, and check the answers: ``pinned`` must be among them,
    and the chain (completed from ``/intermediates`` if it lacks a link: ``completed_chain``)
    must be what was asked for (``check_issued``). Returns the chain and the
    CA's own roots. Bootstrap and ``federatls ca certificate`` both enrol through here.

    Raises ``CARefusedError`` (a 401 carries the hint why a CA refuses a token),
    ``BadMaterialError`` (answers inconsistent, or the certificate not what was asked for),
    ``CAUnreachableError``.
    """
    try:
        signed = await ca.sign(request)
    except CARefusedError as exc:
        if exc.status != 401 or exc.hint:
            raise
        raise exc.with_hint(_REFUSAL_HINT) from exc
    own = await ca.roots_bundle()
    roots = TrustBundle.from_ca(own, ())
    if roots.by_fingerprint(fingerprint(pinned)) is None:
        raise BadMaterialError(
            f"the CA's /roots does not list the pinned root {fingerprint(pinned)} that it "
            "served at /root: its answers are inconsistent, refused"
        )
    chain = await completed_chain(ca, signed.chain, roots)
    check_issued(
        chain,
        key=key.public_key(),
        subject=common_name(request.csr.subject),
        names=split_sans(names),
        roots=roots,
        now=datetime.now(UTC),
    )
    return chain, own


async def bootstrap(
    token: str,
    *,
    key_type: KeyType | str = KeyType.P256,
    lifetime: timedelta | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    name_rules: bool = True,
) -> Identity:
    """Enrol with the CA a one-time token names; returns the ready ``Identity``.

    ``key_type``: P-256 (default), Ed25519, RSA-2048 or RSA-3072 (a ``KeyType`` or its
    name, e.g. ``"Ed25519"``), made in this process.
    ``lifetime``: the certificate lifetime to ask for (the CA's default otherwise, and the
    CA's claims bound it). ``timeout``: seconds for the whole bootstrap, all its calls
    together. ``name_rules=False``: the identity's contexts do not enforce the names each
    federated root may vouch for (as the CA publishes them at ``/federatls/federation``);
    kept across renewal.

    Raises ``TokenError`` (a bad or expired token), ``FingerprintMismatchError`` (the CA
    presented another root: nothing else was sent), ``CARefusedError`` (status and body of
    the refusal), ``CAUnreachableError`` (``CATimeoutError`` past the deadline),
    ``BadMaterialError`` (an answer too large, inconsistent, or a certificate that is not
    for our key and the token's names, not valid now, or a CA's).
    """
    if isinstance(key_type, str):
        key_type = KeyType.parse(key_type)  # ValueError for an unknown name
    parsed, ca_url, sha = _read_token(token, datetime.now(UTC))
    deadline = Deadline.after(timeout, "the bootstrap")
    root = await fetch_root(ca_url, sha, timeout=timeout, deadline=deadline)
    key = new_private_key(key_type)
    sans = list(parsed.sans) or [parsed.subject]
    request = SignRequest(
        build_csr(key, parsed.subject, sans),
        token,
        not_after=TimeDuration(relative=lifetime) if lifetime is not None else None,
    )
    async with CAClient(ca_url, [root], timeout=timeout, deadline=deadline) as ca:
        chain, own = await sign_checked(ca, request, key=key, names=sans, pinned=root)
        trust = await ca.trust_bundle(own)
    identity = Identity.from_parts(chain, key, trust, ca_url, name_rules=name_rules)
    log.info(
        "enrolled %s with %s: serial %d, valid until %s, trusting %d root(s)",
        identity.common_name,
        ca_url,
        identity.serial,
        identity.not_after.isoformat(),
        len(trust),
    )
    return identity


def bootstrap_sync(
    token: str,
    *,
    key_type: KeyType | str = KeyType.P256,
    lifetime: timedelta | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    name_rules: bool = True,
) -> Identity:
    """``bootstrap`` for blocking code (runs it on a private event loop thread)."""

    async def run() -> Identity:
        return await bootstrap(
            token, key_type=key_type, lifetime=lifetime, timeout=timeout, name_rules=name_rules
        )

    return run_sync(run)
