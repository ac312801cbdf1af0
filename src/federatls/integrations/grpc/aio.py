"""``grpc.aio`` with mutual TLS from a federatls identity:

async with federatls.integrations.grpc.aio.secure_channel(live, "api.internal:8443") as ch:
    print(await ch.unary_unary("/demo.Greeter/Hello")(b"hi"))
"""

from __future__ import annotations

from ._channel import AioChannel as Channel
from ._channel import aio_secure_channel as secure_channel

__all__ = ["Channel", "secure_channel"]
