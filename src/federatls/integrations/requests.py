"""requests with mutual TLS from a federatls identity (the ``requests`` extra):

    with federatls.integrations.requests.Session(live, authoriser=...) as session:
        response = session.get("https://api.cloud.internal:8443/")
        print(live.peer(response).anchor)

``Session`` is a ``requests.Session`` whose ``https://`` adapter sends every request through
a urllib3 pool manager of the identity's newest snapshot (``federatls.integrations.urllib3``:
the client context checks the server, name rules and authoriser included, in the handshake;
a refused server raises ``PeerNotAuthorisedError`` before a byte of the request is sent; after
a renewal new requests go to a new pool, and the old one is closed once no request is being
sent through it: a response still being read keeps its connection until it is released,
which then closes it).

Refused with ``ConfigError``, as they would route around that TLS or be ignored:
``http://`` URLs (redirects included: ``http://`` is mounted on an adapter that refuses),
proxies (``session.proxies`` or ``proxies=``), ``verify=`` other than True and ``cert=``
(per request or on the session), and mounting another adapter for ``http(s)://`` URLs.
From the environment (``trust_env``, on by default) the
session takes what requests takes (``.netrc`` credentials) except proxies and CA bundles
(``HTTPS_PROXY``, ``REQUESTS_CA_BUNDLE`` ...): it connects directly, verified against the
identity's bundle, whatever the environment says.

``peer(response)`` works for every response of the session, after its body was read too (the
peer is recorded when the response arrives). A plain ``requests`` response has no peer once
its connection went back to the pool (``stream=False``, or a body read to the end).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, MutableMapping
from typing import Any

try:
    import requests
    from requests.adapters import (
        DEFAULT_POOLBLOCK,
        DEFAULT_POOLSIZE,
        DEFAULT_RETRIES,
        BaseAdapter,
        HTTPAdapter,
    )
    from requests.sessions import merge_setting
    from urllib3.connectionpool import HTTPConnectionPool
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    from .._errors import MissingExtraError

    raise MissingExtraError("federatls.integrations.requests", "requests", exc.name) from exc

from .._authorise import Authoriser
from .._errors import ConfigError
from .._identity import TrustChoice
from . import urllib3 as _urllib3
from ._source import Arguments, Slot, Source, check_common, passed_on, require_https

__all__ = ["Session"]

_WHAT = "federatls.integrations.requests.Session"
# The session's own arguments are HTTPAdapter's pool settings; TLS and proxies are refused
# per request (``_Adapter.send``), where requests takes them.
_ARGS = Arguments(
    where=_WHAT,
    library="requests' HTTPAdapter",
    refused={},
    passed_on=frozenset({"pool_connections", "pool_maxsize", "max_retries", "pool_block"}),
    otherwise="a plain requests session",
)


class _PlainRefused(BaseAdapter):
    """Mounted on ``http://``: refuses, so no request (nor redirect) leaves without TLS."""

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        require_https(_WHAT, str(request.url), otherwise="a plain requests session")

    def close(self) -> None:
        pass


class _Adapter(HTTPAdapter):
    """requests' HTTP adapter over a urllib3 pool manager per snapshot (urllib3.Swapping)."""

    def __init__(
        self,
        source: Source,
        trust: TrustChoice,
        authoriser: Authoriser | None,
        pool_connections: int = DEFAULT_POOLSIZE,
        pool_maxsize: int = DEFAULT_POOLSIZE,
        max_retries: Any = DEFAULT_RETRIES,
        pool_block: bool = DEFAULT_POOLBLOCK,
    ) -> None:
        super().__init__(pool_connections, pool_maxsize, max_retries, pool_block)
        self._managers = _urllib3.swapping(
            source, trust, authoriser, pool_connections, maxsize=pool_maxsize, block=pool_block
        )
        self._local = threading.local()

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        require_https(_WHAT, str(request.url), otherwise="a plain requests session")
        if verify is not True:
            raise ConfigError(
                f"{_WHAT}: verify={verify!r} would replace the server check: the server is "
                "verified against the identity's trust bundle; instead choose it with "
                "trust='own' or 'federation' and narrow it with authoriser="
            )
        if cert is not None:
            raise ConfigError(
                f"{_WHAT}: cert= would be ignored: the client certificate is the identity's; "
                "instead enrol the identity you mean to present"
            )
        if any(proxies.values() if proxies else ()):
            raise ConfigError(
                f"{_WHAT}: proxies={dict(proxies or {})!r} would send requests through a "
                "proxy; the session connects directly: instead use a plain requests session "
                "for hosts outside the federation"
            )
        slot, to_close = self._managers.acquire()
        for old in to_close:
            old.close()
        self._local.slot = slot
        try:
            response = super().send(request, stream, timeout, verify, cert, proxies=None)
        except BaseException as exc:
            _urllib3.raise_refusal(exc)
            raise
        finally:
            del self._local.slot
            # Used until urlopen returns: see federatls.integrations.urllib3's docstring.
            self._release(slot)
        # ``peer(response)`` finds the record its urllib3 response got when it arrived.
        return response

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: Any = None,
    ) -> HTTPConnectionPool:
        slot: Slot[_urllib3.HTTPSOnly] = self._local.slot
        return slot.resource.connection_from_url(str(request.url))

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        """Nothing to set: requests' own would load its CA bundle into the context."""

    def _release(self, slot: Slot[_urllib3.HTTPSOnly]) -> None:
        done = self._managers.release(slot)
        if done is not None:
            done.close()

    def close(self) -> None:
        super().close()
        for manager in self._managers.close():
            manager.close()


def _other_adapter(what: str) -> ConfigError:
    """The refusal of ``what``: requests sent through an adapter other than federatls's."""
    return ConfigError(
        f"{_WHAT}: {what}, without federatls's TLS: pass max_retries=, pool_connections=, "
        "pool_maxsize= or pool_block= to the Session instead (or use a plain requests session "
        "for hosts outside the federation)"
    )


class Session(requests.Session):
    """``requests.Session`` speaking mutual TLS as ``source`` (an ``Identity`` or a
    ``RenewingIdentity``), servers checked by ``authoriser`` before anything is sent.
    ``pool_connections``, ``pool_maxsize``, ``max_retries`` and ``pool_block`` are
    ``HTTPAdapter``'s."""

    def __init__(
        self,
        source: Source,
        *,
        authoriser: Authoriser | None = None,
        trust: TrustChoice = "federation",
        **adapter_kw: Any,
    ) -> None:
        check_common(_WHAT, source, trust, authoriser)
        passed_on(_ARGS, adapter_kw)
        super().__init__()
        self.mount("https://", _Adapter(source, trust, authoriser, **adapter_kw))
        self.mount("http://", _PlainRefused())
        self._ours = True

    _ours = False  # set once federatls's adapters are mounted

    def mount(self, prefix: str, adapter: BaseAdapter) -> None:
        """requests' ``mount``, refusing (``ConfigError``) an adapter that would take
        ``http://`` or ``https://`` URLs from federatls's (the common
        ``mount("https://", HTTPAdapter(max_retries=...))`` would drop the identity, the
        trust bundle and the authoriser without a word)."""
        low = prefix.lower()
        web = low.startswith(("http://", "https://")) or any(
            scheme.startswith(low) for scheme in ("http://", "https://")
        )
        if self._ours and web and not isinstance(adapter, _Adapter | _PlainRefused):
            raise _other_adapter(
                f"mount({prefix!r}, {type(adapter).__name__}(...)) would send requests "
                "through another adapter"
            )
        super().mount(prefix, adapter)

    def get_adapter(self, url: str) -> BaseAdapter:
        """requests' ``get_adapter``, refusing (``ConfigError``) any adapter but federatls's
        for http(s):// URLs, however it got into ``session.adapters`` (written there
        directly, without ``mount``): checked at every request, before any connection."""
        adapter = super().get_adapter(url)
        web = url.lower().startswith(("http://", "https://"))
        if self._ours and web and not isinstance(adapter, _Adapter | _PlainRefused):
            raise _other_adapter(
                f"{url!r} would go through {type(adapter).__name__}, found in session.adapters"
            )
        return adapter

    def merge_environment_settings(
        self,
        url: str | bytes | None,
        proxies: MutableMapping[str, str] | None,
        stream: bool | None,
        verify: bool | str | None,
        cert: Any,
    ) -> dict[str, Any]:
        # requests' own, without the environment's proxies and CA bundles (see the module's
        # docstring): the explicit settings, the request's over the session's.
        return {
            "proxies": merge_setting(proxies, self.proxies),
            "stream": merge_setting(stream, self.stream),
            "verify": merge_setting(verify, self.verify),
            "cert": merge_setting(cert, self.cert),
        }

    def rebuild_proxies(
        self, prepared_request: requests.PreparedRequest, proxies: dict[str, str] | None
    ) -> dict[str, str]:
        # On a redirect requests would add the environment's proxies: not here (as above).
        prepared_request.headers.pop("Proxy-Authorization", None)
        return dict(proxies or {})
