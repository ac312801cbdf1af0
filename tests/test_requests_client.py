"""requests and urllib3 with a federatls identity (``federatls.integrations.requests.Session``
and ``federatls.integrations.urllib3.PoolManager``): servers checked in the handshake (trust
bundle, name rules, authoriser) before a byte of a request, refusals raised as
``PeerNotAuthorisedError``, pools recycled after a renewal, arguments that would route around
the TLS refused, and live traffic through renewals and a root rotation.

Real federatls CAs (federated pair, 3-second certificates; tests/test_live_swap.py), real TLS
servers on 127.0.0.1 (its keep-alive ``streams_server``, which records each connection's
client serial and when it ends), real requests and urllib3; the blocking clients run on
worker threads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
import requests
import urllib3

from federatls import (
    Identity,
    PeerInfo,
    PeerNotAuthorisedError,
    RenewingIdentity,
    allow_names,
)
from federatls._x509 import fingerprint
from federatls.integrations import requests as frequests
from federatls.integrations import urllib3 as furllib3
from federatls.testing import TestCA, running_ca
from test_live_swap import LONG, SERVER_NAMES, Seen, enrol, pair, streams_server

import traffic

pytestmark = pytest.mark.anyio
__all__ = ["pair"]  # the fixture, used by name

Source = Identity | RenewingIdentity


# Clients: one GET each, the same shape for requests and urllib3 ------------------------------
class Client:
    """A blocking client under test: ``get`` returns (status, body, the response)."""

    def __init__(self, kind: str, source: Source, authoriser: Any = None, **kw: Any) -> None:
        self.kind = kind
        self.http: frequests.Session | furllib3.PoolManager
        if kind == "requests":
            self.http = frequests.Session(source, authoriser=authoriser, **kw)
        else:
            self.http = furllib3.PoolManager(source, authoriser=authoriser, retries=0, **kw)

    def get(self, url: str, **kw: Any) -> tuple[int, str, Any]:
        if isinstance(self.http, frequests.Session):
            response = self.http.get(url, timeout=10, **kw)
            return response.status_code, response.text, response
        answer = self.http.request("GET", url, timeout=10, **kw)
        return answer.status, answer.data.decode(), answer

    def close(self) -> None:
        if isinstance(self.http, frequests.Session):
            self.http.close()
        else:
            self.http.clear()


KINDS = ["requests", "urllib3"]


@contextlib.contextmanager
def client(kind: str, source: Source, authoriser: Any = None, **kw: Any) -> Iterator[Client]:
    made = Client(kind, source, authoriser, **kw)
    try:
        yield made
    finally:
        made.close()


async def get(http: Client, port: int, **kw: Any) -> tuple[int, str, Any]:
    return await anyio.to_thread.run_sync(functools.partial(http.get, _url(port), **kw))


def _url(port: int) -> str:
    return f"https://127.0.0.1:{port}/"


@pytest.fixture
def outsider(pair: tuple[TestCA, TestCA]) -> Iterator[TestCA]:
    """A third CA trusting cloud and kubernetes, which do not trust it."""
    with running_ca("elsewhere") as ca:
        ca.federate(*pair)
        yield ca


# 1. Federated servers reached, others refused -------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
async def test_federated_server_reached(pair: tuple[TestCA, TestCA], kind: str) -> None:
    """A kubernetes client reaches a cloud server: 200, the server saw the client's serial,
    and ``live.peer(response)`` names the server after the body was read."""
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "client.k8s.internal", lifetime=LONG))
    async with streams_server(server, seen, None) as port:
        with client(kind, live) as http:
            status, body, response = await get(http, port)
            peer = live.peer(response)
    assert (status, body) == (200, "1")
    assert isinstance(peer, PeerInfo)
    assert peer.serial == server.serial
    assert peer.anchor is not None
    assert peer.anchor.certificate == cloud.root
    assert seen.serials == {"client.k8s.internal": {live.current.serial}}


@pytest.mark.parametrize("kind", KINDS)
async def test_unfederated_server_refused(
    pair: tuple[TestCA, TestCA], outsider: TestCA, kind: str
) -> None:
    """Twin: a server of a CA kubernetes does not federate (it trusts the client) is refused
    in the handshake (CERTIFICATE_VERIFY_FAILED) and handles no request."""
    _, kubernetes = pair
    seen = Seen()
    stranger = await enrol(outsider, "server.elsewhere.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "client.k8s.internal", lifetime=LONG))
    async with streams_server(stranger, seen, None) as port:
        with client(kind, live) as http:
            errors = (requests.exceptions.SSLError, urllib3.exceptions.MaxRetryError)
            with pytest.raises(errors) as info:
                await get(http, port)
            await anyio.sleep(0.1)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert furllib3.refusal_in(info.value) is None
    assert seen.handled == 0


# 2. Refused by the authoriser or the name rules, before the request ------------------------
@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "refused"])
@pytest.mark.parametrize("kind", KINDS)
async def test_authoriser(
    pair: tuple[TestCA, TestCA], kind: str, allowed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A server the authoriser refuses raises ``PeerNotAuthorisedError`` (naming the rule,
    carrying the server's PeerInfo, logged once) and the server sees no request. Twin: the
    server it allows answers."""
    caplog.set_level(logging.WARNING, logger="federatls.peer")
    cloud, kubernetes = pair
    seen = Seen()
    server = await enrol(cloud, "server.cloud.internal", SERVER_NAMES, LONG)
    live = RenewingIdentity(await enrol(kubernetes, "client.k8s.internal", lifetime=LONG))
    rule = allow_names("server.cloud.internal" if allowed else "other.cloud.internal")
    async with streams_server(server, seen, None) as port:
        with client(kind, live, rule) as http:
            if allowed:
                status, _, _ = await get(http, port)
                assert status == 200
            else:
                with pytest.raises(PeerNotAuthorisedError, match=r"other\.cloud\.internal") as e:
                    await get(http, port)
                assert e.value.peer.serial == server.serial
            await anyio.sleep(0.1)  # a request wrongly sent would have been handled by now
    refusals = [r for r in caplog.records if r.name == "federatls.peer"]
    if allowed:
        assert seen.handled == 1
        assert refusals == []
    else:
        assert seen.handled == 0
        assert len(refusals) == 1
        assert "(authoriser)" in refusals[0].getMessage()


K8S_NAMES = ["*.k8s.internal", "127.0.0.1"]


@pytest.mark.parametrize("name", ["payments.cloud.internal", "api.k8s.internal"])
@pytest.mark.parametrize("kind", KINDS)
async def test_name_rules(kind: str, name: str) -> None:
    """Cloud follows kubernetes allowing it only *.k8s.internal: a cloud client refuses a
    kubernetes server naming itself payments.cloud.internal (``PeerNotAuthorisedError``, no
    request handled). Twin: the kubernetes server named api.k8s.internal answers."""
    async with traffic.federatls_ca("cloud") as cloud, traffic.federatls_ca("kubernetes") as k8s:
        await k8s.federate(cloud)
        await cloud.follow(k8s, K8S_NAMES)
        for _ in range(150):  # 30 s at most
            if fingerprint(k8s.root) in await cloud.federation():
                break
            await anyio.sleep(0.2)
        else:
            raise TimeoutError("cloud does not follow kubernetes")
        server = await traffic.enrol(k8s, name, [name, "127.0.0.1"], LONG)
        me = await traffic.enrol(cloud, "client.cloud.internal", lifetime=LONG)
        seen = Seen()
        async with streams_server(server, seen, None) as port:
            with client(kind, me) as http:
                if name.endswith(".k8s.internal"):
                    status, _, _ = await get(http, port)
                    assert status == 200
                else:
                    with pytest.raises(PeerNotAuthorisedError, match="may only vouch for"):
                        await get(http, port)
                await anyio.sleep(0.1)
    assert seen.handled == (1 if name.endswith(".k8s.internal") else 0)
