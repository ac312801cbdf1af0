"""gRPC asyncio (``grpc.aio.server``) with mutual TLS from a federatls identity (the ``grpc``
extra): the same credentials and checks as ``federatls.integrations.grpc``.

    server = grpc.aio.server(interceptors=[Interceptor(live, authoriser=...)])
    server.add_secure_port("0.0.0.0:8443", server_credentials(live))
"""

from __future__ import annotations

from ._server import AioInterceptor as Interceptor
from ._server import peer, server_credentials

__all__ = ["Interceptor", "peer", "server_credentials"]
