"""Test helpers for code that uses federatls: real CAs running in this process, so tests of
mutual TLS need no external CA, no Go binary and no files of their own.

    from federatls.testing import federated_pair

    def test_my_service():
        with federated_pair() as (cloud, kubernetes):
            server = cloud.identity("server.cloud.internal", sans=["127.0.0.1"])
            client = kubernetes.identity("client.k8s.internal")
            ...  # server.server_context(), client.client_context()

With pytest, ``pytest_plugins = ["federatls.testing"]`` in a conftest.py gives the fixtures
``federatls_ca`` (one CA) and ``federatls_pair`` (two CAs federated both ways).

Each CA is the federatls CA (the ``ca`` extra: aiohttp), on 127.0.0.1 with a free port,
with a PKI made at run time in a temporary directory and an event loop on a thread of its
own, so sync and async tests can use it alike. Not for production.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal
from cryptography import x509

from ._errors import MissingExtraError

try:  # the CAs these helpers run are the federatls CA, which needs the `ca` extra
    import aiohttp  # noqa: F401
except ModuleNotFoundError as exc:
    raise MissingExtraError("federatls.testing", "ca", exc.name) from exc

from ._bootstrap import bootstrap_sync
from ._identity import Identity
from ._jwk import ProvisionerKey
from ._keys import KeyType
from ._token import DEFAULT_VALIDITY, mint_token, revoke_audience, sign_audience
from ._x509 import load_pem_certificate
from .ca import init_pki

__all__ = ["TestCA", "federated_pair", "running_ca"]


class TestCA:
    """A federatls CA running in this process for tests. Use ``running_ca()``."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(
        self,
        name: str,
        config: Path,
        root_path: Path,
        password: bytes,
        portal: BlockingPortal,
        server: Any,
    ) -> None:
        self.name = name
        self.config = config
        self.root_path = root_path
        self.root: x509.Certificate = load_pem_certificate(root_path.read_bytes())
        self._password = password
        self._portal = portal
        self._server = server
        data = json.loads(config.read_text())
        prov = data["authority"]["provisioners"][0]
        self.provisioner: str = prov["name"]
        self._key = ProvisionerKey.decrypt(prov["encryptedKey"], password)

    @property
    def url(self) -> str:
        """The CA's URL, ``https://127.0.0.1:<port>``."""
        url: str = self._server.url
        return url

    @property
    def root_fingerprint(self) -> str:
        fp: str = self._server.root_fingerprint
        return fp

    def token(
        self,
        subject: str,
        *,
        sans: Sequence[str] = (),
        revoke: bool = False,
        validity: timedelta = DEFAULT_VALIDITY,
        csr: x509.CertificateSigningRequest | None = None,
    ) -> str:
        """A one-time token for ``subject`` (``sans`` default to the subject), exactly as
        ``step ca token`` makes it; with ``csr``, bound to that request (``cnf``, as
        ``step ca token --cnf-file``)."""
        aud = revoke_audience(self.url) if revoke else sign_audience(self.url)
        return mint_token(
            self._key,
            issuer=self.provisioner,
            subject=subject,
            audience=aud,
            now=datetime.now(UTC),
            sans=sans,
            root_fingerprint=self.root_fingerprint,
            validity=validity,
            csr=csr,
        )

    def identity(
        self,
        subject: str,
        *,
        sans: Sequence[str] = (),
        key_type: KeyType = KeyType.P256,
        lifetime: timedelta | None = None,
    ) -> Identity:
        """Bootstrap an identity for ``subject`` from this CA (blocking)."""
        return bootstrap_sync(self.token(subject, sans=sans), key_type=key_type, lifetime=lifetime)

    @property
    def directory(self) -> Path:
        """The CA's directory (``certs/``, ``secrets/``, ``config/ca.json``)."""
        return self.config.parent.parent

    @property
    def password(self) -> bytes:
        """The CA password (random, made for this test CA)."""
        return self._password

    def federate(self, *others: TestCA) -> None:
        """List ``others``' roots in this CA's ``federatedRoots`` and reload (SIGHUP's way)."""
        data = json.loads(self.config.read_text())
        data["federatedRoots"] = [str(o.root_path) for o in others]
        self.config.write_text(json.dumps(data, indent=2))
        self.reload()

    def reload(self) -> None:
        """Re-read ca.json, as SIGHUP does; ``RuntimeError`` if the file is broken."""
        if not self._portal.call(self._reload):
            raise RuntimeError(f"CA {self.name} could not reload its configuration")

    async def _reload(self) -> bool:
        ok: bool = self._server.reload()
        return ok

    def __repr__(self) -> str:
        return f"TestCA({self.name!r}, {self.url})"


@contextlib.contextmanager
def running_ca(
    name: str = "test",
    *,
    directory: Path | None = None,
    claims: dict[str, Any] | None = None,
    backdate: str | None = None,
) -> Iterator[TestCA]:
    """A CA for ``name`` (root ``<name> Root CA``) serving on 127.0.0.1 until the block ends.

    ``claims`` are step's provisioner claims, e.g. ``{"minTLSCertDuration": "5s",
    "defaultTLSCertDuration": "1m"}`` for short-lived certificates; ``backdate`` step's
    ``authority.backdate`` (default ``"1m"``; say ``"1s"`` with certificates of seconds).
    """
    from .ca._server import CAServer

    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="federatls-test-"))
            )
        password = secrets.token_urlsafe(24).encode()
        made = init_pki(
            name,
            directory / name,
            address="127.0.0.1:0",
            password=password,
            now=datetime.now(UTC),
            dns_names=["127.0.0.1", "localhost"],
        )
        if claims or backdate:
            data = json.loads(made.config.read_text())
            if claims:
                data["authority"]["provisioners"][0]["claims"] = claims
            if backdate:
                data["authority"]["backdate"] = backdate
            made.config.write_text(json.dumps(data, indent=2))
        portal = stack.enter_context(start_blocking_portal())
        server = stack.enter_context(
            portal.wrap_async_context_manager(CAServer.running(made.config, password))
        )
        yield TestCA(name, made.config, made.root, password, portal, server)


@contextlib.contextmanager
def federated_pair(
    first: str = "cloud",
    second: str = "kubernetes",
    *,
    mutual: bool = True,
    claims: dict[str, Any] | None = None,
    backdate: str | None = None,
) -> Iterator[tuple[TestCA, TestCA]]:
    """Two CAs, the first listing the second's root in ``federatedRoots`` and, with
    ``mutual`` (the default), the second the first's."""
    with (
        running_ca(first, claims=claims, backdate=backdate) as a,
        running_ca(second, claims=claims, backdate=backdate) as b,
    ):
        a.federate(b)
        if mutual:
            b.federate(a)
        yield a, b


try:  # pytest fixtures, for `pytest_plugins = ["federatls.testing"]`
    import pytest
except ImportError:  # pragma: no cover - pytest is optional
    pass
else:

    @pytest.fixture
    def federatls_ca() -> Iterator[TestCA]:
        """A federatls CA running in this process for the test."""
        with running_ca("test") as ca:
            yield ca

    @pytest.fixture
    def federatls_pair() -> Iterator[tuple[TestCA, TestCA]]:
        """Two federatls CAs ("cloud", "kubernetes") federated both ways."""
        with federated_pair() as pair:
            yield pair
