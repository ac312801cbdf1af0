"""gRPC (``grpcio``) with mutual TLS from a federatls identity; ``grpc.aio`` in ``.aio``:

    with federatls.integrations.grpc.secure_channel(live, "api.cloud.internal:8443") as channel:
        hello = channel.unary_unary("/demo.Greeter/Hello")
        print(hello(b"hi"))

Client channels follow renewal (``secure_channel``: ``_channel``).
"""

from __future__ import annotations

from ..._errors import MissingExtraError

try:
    import grpc  # noqa: F401
    import h2  # noqa: F401  # the bridge of channels with an authoriser
except ModuleNotFoundError as exc:
    raise MissingExtraError("federatls.integrations.grpc", "grpc", exc.name) from exc

from ._channel import Channel, secure_channel

__all__ = ["Channel", "secure_channel"]
