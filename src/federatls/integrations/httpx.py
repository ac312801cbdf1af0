"""httpx clients with mutual TLS from a federatls identity:

    async with federatls.integrations.httpx.AsyncClient(live, authoriser=...) as client:
        response = await client.get("https://api.cloud.internal:8443/")
        print(live.peer(response).anchor)

``Client`` and ``AsyncClient`` are httpx's own, with a transport that

* opens every new connection with the source's newest client context, so a
  ``RenewingIdentity``'s renewals (certificate and trust bundle) reach new connections;
* retires the pool of the previous snapshot after a swap: its idle connections are closed
  as soon as no request is using it, so no connection keeps presenting an old certificate;
* checks the server with the authoriser right after the TLS handshake, before a byte of
  the request is sent (a refused server raises ``PeerNotAuthorisedError``);
* refuses ``http://`` URLs (redirects included) with ``ConfigError``: they would go without
  TLS and without the authoriser.

That transport is the only one: arguments that would give httpx another (``proxy=``,
``mounts=``, ``transport=``) or that it would ignore (``verify=``, ``cert=``, ``http1=``)
are refused with ``ConfigError``, as is anything not in ``_httpx_shared._PASSED_ON``.
Proxies from the environment (``HTTPS_PROXY``, ``ALL_PROXY``) are not used: httpx skips
them when given a transport (tests/test_httpx_client.py checks it).

HTTP/1.1 and HTTP/2 as httpx does them (``http2=True`` needs the ``h2`` package).

The transport is written once: ``_httpx_async`` holds ``AsyncClient``'s, and ``Client``'s
(``_httpx_sync``) is generated from it by scripts/unasync.py.
"""

from __future__ import annotations

from ._httpx_async import AsyncClient
from ._httpx_sync import Client

__all__ = ["AsyncClient", "Client"]
