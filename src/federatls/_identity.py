"""A workload's identity: its certificate chain, its private key (kept in memory), and the
roots it trusts with their provenance. It hands out ``ssl.SSLContext``s and tells who a peer
is. Not here: getting an identity (``_bootstrap``) or keeping it fresh (renewal).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ._authorise import Authoriser, authorise_connection
from ._contexts import new_client_context, new_server_context
from ._keys import PrivateKey
from ._peer import PeerInfo, peer_info
from ._trust import TrustBundle
from ._x509 import CertificateFacts, certs_to_pem

__all__ = ["Identity", "TrustChoice"]

TrustChoice = Literal["federation", "own"]


@dataclass(frozen=True, eq=False)
class Identity(CertificateFacts):
    """A certificate chain (leaf first, no root), its private key, and the trust bundle of
    its CA (own roots and federated roots, each with its provenance and the names it may
    vouch for). ``name_rules``: whether its contexts enforce those names (the default; see
    ``bootstrap``); renewal keeps it.

    The private key never leaves memory unless ``export_private_key`` is called.
    """

    chain: tuple[x509.Certificate, ...]
    trust: TrustBundle
    ca_url: str
    _key: PrivateKey = field(repr=False)
    name_rules: bool = True

    @classmethod
    def from_parts(
        cls,
        chain: Sequence[x509.Certificate],
        key: PrivateKey,
        trust: TrustBundle,
        ca_url: str,
        *,
        name_rules: bool = True,
    ) -> Identity:
        return cls(chain=tuple(chain), trust=trust, ca_url=ca_url, _key=key, name_rules=name_rules)

    # The certificate --------------------------------------------------------------------------
    @property
    def certificate(self) -> x509.Certificate:  # type: ignore[override]  # read-only here
        """The leaf: ``chain[0]``."""
        return self.chain[0]

    @property
    def chain_pem(self) -> str:
        return certs_to_pem(self.chain)

    @property
    def own_roots(self) -> TrustBundle:
        """The roots of the workload's own CA only (``/roots``)."""
        return self.trust.own()

    def _bundle(self, trust: TrustChoice) -> TrustBundle:
        if trust == "federation":
            return self.trust
        if trust == "own":
            return self.own_roots
        raise ValueError(f"trust must be 'federation' or 'own', not {trust!r}")

    # Contexts ---------------------------------------------------------------------------------
    def server_context(
        self,
        *,
        trust: TrustChoice = "federation",
        require_client_certificate: bool = True,
        authoriser: Authoriser | None = None,
    ) -> ssl.SSLContext:
        """A TLS server context: this identity's certificate; client certificates required
        (optional with ``require_client_certificate=False``) and verified against the
        federation bundle (or only the own CA's roots with ``trust="own"``), unless
        ``name_rules`` is off its name rules, and then ``authoriser``: a client it refuses
        (or one without a certificate, when there is an authoriser) fails the handshake,
        logged, before the server reads a byte from it."""
        return new_server_context(
            self.chain,
            self._key,
            self._bundle(trust),
            require_client_certificate=require_client_certificate,
            name_rules=self.name_rules,
            authoriser=authoriser,
        )

    def client_context(
        self,
        *,
        trust: TrustChoice = "federation",
        check_hostname: bool = True,
        authoriser: Authoriser | None = None,
        alpn: Sequence[str] = (),
    ) -> ssl.SSLContext:
        """A TLS client context: this identity's certificate for mutual TLS; servers
        verified against the federation bundle (or own roots), unless ``name_rules`` is off
        its name rules, and ``authoriser``; their host name checked; ``alpn``, the
        protocols offered (none by default). A refused server fails the handshake
        (``ssl.SSLCertVerificationError`` whose ``__cause__`` is the
        ``PeerNotAuthorisedError``), logged, before a byte is sent to it."""
        ctx = new_client_context(
            self.chain,
            self._key,
            self._bundle(trust),
            check_hostname=check_hostname,
            name_rules=self.name_rules,
            authoriser=authoriser,
        )
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx

    # Peers ------------------------------------------------------------------------------------
    def peer(self, conn: object) -> PeerInfo:
        """Who is on the other end of ``conn`` and which of our roots anchored it."""
        return peer_info(conn, self.trust)

    def authorise(self, conn: object, authoriser: Authoriser | None) -> PeerInfo:
        """``peer(conn)``, refused with ``PeerNotAuthorisedError`` (and a log line) unless
        ``authoriser`` allows it. Close the connection on refusal."""
        return authorise_connection(conn, self.trust, authoriser)

    # The key ----------------------------------------------------------------------------------
    def export_private_key(self, *, password: bytes | None) -> bytes:
        """The private key as PKCS#8 PEM, encrypted with ``password``; ``password=None``
        exports it in plaintext (say so explicitly: it then lives wherever you put it)."""
        encryption: serialization.KeySerializationEncryption
        if password is None:
            encryption = serialization.NoEncryption()
        elif not password:
            raise ValueError("an empty password would protect nothing: give one, or None")
        else:
            encryption = serialization.BestAvailableEncryption(password)

        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def public_key_matches(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` is for this identity's key."""
        fmt = serialization.PublicFormat.SubjectPublicKeyInfo
        return cert.public_key().public_bytes(serialization.Encoding.DER, fmt) == (
            self._key.public_key().public_bytes(serialization.Encoding.DER, fmt)
        )

    def __repr__(self) -> str:
        return (
            f"Identity({self.common_name!r}, serial={self.serial}, "
            f"not_after={self.not_after.isoformat()}, roots={len(self.trust)}"
            f"{'' if self.name_rules else ', name_rules=False'})"
        )
