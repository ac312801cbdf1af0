"""Trust with provenance: every root a workload trusts, with where it came from (its own CA,
federated through it, or followed from one of its peers), its fingerprint and subject, and the
names it may vouch for when its CA says so (``_namerules`` builds and enforces those). Pure:
values and lookups, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

from ._errors import BadMaterialError
from ._x509 import certs_to_pem, common_name, fingerprint, issued_by

if TYPE_CHECKING:  # _authorise imports this module
    from ._authorise import NamePattern

__all__ = ["Provenance", "TrustBundle", "TrustedRoot"]


class Provenance(enum.Enum):
    """Where a trusted root came from, seen from the workload's own CA."""

    OWN = "own"  # one of the CA's own roots (``/roots``)
    FEDERATED = "federated"  # listed in the CA's ``federatedRoots`` (``/federation`` only)
    PEER = "peer"  # a root of a peer CA the workload's CA follows (``/federatls/federation``)


@dataclass(frozen=True)
class TrustedRoot:
    """A root certificate the workload trusts. ``names``: the name patterns it may vouch for,
    None for any name (the own CA's roots, static ``federatedRoots``, and every root of a CA
    that publishes no structure, such as a plain step-ca); ``peers``: the peers of the CA
    that list it (``Provenance.PEER``), for messages."""

    certificate: x509.Certificate
    fingerprint: str  # hex SHA-256 of the DER, as step prints it
    subject: str  # RFC 4514
    common_name: str
    provenance: Provenance
    names: tuple[NamePattern, ...] | None = None
    peers: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        certificate: x509.Certificate,
        provenance: Provenance,
        *,
        names: tuple[NamePattern, ...] | None = None,
        peers: tuple[str, ...] = (),
    ) -> TrustedRoot:
        return cls(
            certificate=certificate,
            fingerprint=fingerprint(certificate),
            subject=certificate.subject.rfc4514_string(),
            common_name=common_name(certificate.subject),
            provenance=provenance,
            names=names,
            peers=peers,
        )

    def __str__(self) -> str:
        name = self.common_name or self.subject
        source = f"peer {', '.join(self.peers)}" if self.peers else self.provenance.value
        return f"{name} ({source}, {self.fingerprint[:16]}...)"


@dataclass(frozen=True)
class TrustBundle:
    """An ordered set of trusted roots (no duplicates)."""

    roots: tuple[TrustedRoot, ...]

    @classmethod
    def from_ca(
        cls, own: Sequence[x509.Certificate], federation: Sequence[x509.Certificate]
    ) -> TrustBundle:
        """The bundle a CA's ``/roots`` and ``/federation`` describe: own roots first, then the
        federated ones. ``/federation`` includes the own roots (step-ca does); a root that is
        in ``/roots`` but missing from ``/federation`` is still trusted."""
        if not own:
            raise BadMaterialError("the CA sent no root of its own")
        own_prints = {fingerprint(c) for c in own}
        roots: dict[str, TrustedRoot] = {}
        for cert in own:
            roots.setdefault(fingerprint(cert), TrustedRoot.of(cert, Provenance.OWN))
        for cert in federation:
            fp = fingerprint(cert)
            if fp not in own_prints:
                roots.setdefault(fp, TrustedRoot.of(cert, Provenance.FEDERATED))
        return cls(tuple(roots.values()))

    @property
    def has_name_rules(self) -> bool:
        """Whether some root may vouch only for some names (so peers are name-checked)."""
        return any(r.names is not None for r in self.roots)

    def own(self) -> TrustBundle:
        """Only the CA's own roots."""
        return TrustBundle(tuple(r for r in self.roots if r.provenance is Provenance.OWN))

    @property
    def pem(self) -> str:
        return certs_to_pem(r.certificate for r in self.roots)

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        return tuple(r.certificate for r in self.roots)

    def by_fingerprint(self, sha: str) -> TrustedRoot | None:
        sha = sha.lower().replace(":", "").replace("-", "")
        return next((r for r in self.roots if r.fingerprint == sha), None)

    def anchor_of(self, top: x509.Certificate) -> TrustedRoot | None:
        """The root of this bundle that is ``top`` or that issued it, else None."""
        found = self.by_fingerprint(fingerprint(top))
        if found is not None:
            return found
        for root in self.roots:
            if root.certificate.subject == top.issuer and issued_by(top, root.certificate):
                return root
        return None

    def __iter__(self) -> Iterator[TrustedRoot]:
        return iter(self.roots)

    def __len__(self) -> int:
        return len(self.roots)
