"""gRPC (sync ``grpc.server``) with mutual TLS from a federatls identity (the ``grpc`` extra);
``federatls.integrations.grpc.aio`` is the same for ``grpc.aio``.

    server = grpc.server(ThreadPoolExecutor(8),
                         interceptors=[Interceptor(live, authoriser=allow_names("*.k8s.internal"))])
    server.add_secure_port("0.0.0.0:8443", server_credentials(live))

``server_credentials`` follow renewal and the trusted roots on every new connection;
``Interceptor`` checks each call's client (chain against the roots trusted now, name rules,
authoriser) before its handler runs; ``peer(context)`` gives a handler its ``PeerInfo``.
"""

from __future__ import annotations

from ..._errors import MissingExtraError

try:
    import grpc  # noqa: F401
except ModuleNotFoundError as exc:
    raise MissingExtraError("federatls.integrations.grpc", "grpc", exc.name) from exc

from ._server import Interceptor, peer, server_credentials

__all__ = ["Interceptor", "peer", "server_credentials"]
