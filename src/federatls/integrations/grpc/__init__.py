"""gRPC (sync ``grpc.server`` and channels) with mutual TLS from a federatls identity (the
``grpc`` extra); ``federatls.integrations.grpc.aio`` is the same for ``grpc.aio``.

    server = grpc.server(ThreadPoolExecutor(8),
                         interceptors=[Interceptor(live, authoriser=allow_names("*.k8s.internal"))])
    server.add_secure_port("0.0.0.0:8443", server_credentials(live))

    with secure_channel(live, "api.cloud.internal:8443") as channel:
        print(channel.unary_unary("/demo.Greeter/Hello")(b"hi"))

``server_credentials`` follow renewal and the trusted roots on every new connection;
``Interceptor`` checks each call's client (chain against the roots trusted now, name rules,
authoriser) before its handler runs; ``peer(context)`` gives a handler its ``PeerInfo``.
``secure_channel`` follows renewal too (new calls on the newest snapshot's channel, the old
one closed once its calls end) and checks the server (``_channel``).
"""

from __future__ import annotations

from ..._errors import MissingExtraError

try:
    import grpc  # noqa: F401
    import h2  # noqa: F401  # the bridge of channels with an authoriser
except ModuleNotFoundError as exc:
    raise MissingExtraError("federatls.integrations.grpc", "grpc", exc.name) from exc

from ._channel import Channel, secure_channel
from ._server import Interceptor, peer, server_credentials

__all__ = ["Channel", "Interceptor", "peer", "secure_channel", "server_credentials"]
