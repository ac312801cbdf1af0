"""gRPC asyncio (``grpc.aio``) with mutual TLS from a federatls identity (the ``grpc``
extra): the same credentials, checks and channels as ``federatls.integrations.grpc``.

    server = grpc.aio.server(interceptors=[Interceptor(live, authoriser=...)])
    server.add_secure_port("0.0.0.0:8443", server_credentials(live))

    async with secure_channel(live, "api.cloud.internal:8443") as channel:
        print(await channel.unary_unary("/demo.Greeter/Hello")(b"hi"))
"""

from __future__ import annotations

from ._channel import AioChannel as Channel
from ._channel import aio_secure_channel as secure_channel
from ._server import AioInterceptor as Interceptor
from ._server import peer, server_credentials

__all__ = ["Channel", "Interceptor", "peer", "secure_channel", "server_credentials"]
