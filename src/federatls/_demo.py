"""``federatls demo``: the federation tutorial on one machine.

Two autonomous CAs ("cloud" and "kubernetes") are made in a temporary directory and started.
A server enrolls with cloud, a client with kubernetes (``bootstrap(token)``, as any workload
would). Without federation the server refuses the client; once each CA lists the other's root
in ``federatedRoots`` (and reloads), new enrolments trust the federation bundle and mutual TLS
works across the two CAs. Everything is cleaned up unless ``--keep`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from ._bootstrap import bootstrap
from ._errors import PeerNotAuthorisedError
from ._identity import Identity
from ._jwk import ProvisionerKey
from ._token import mint_token, sign_audience
from .integrations import streams

__all__ = ["run_demo"]


def _say(step: int, text: str) -> None:
    print(f"\n[{step}] {text}", flush=True)


def _detail(text: str) -> None:
    print(f"    {text}", flush=True)


def _token(ca_url: str, config: Path, password: bytes, subject: str, root_sha: str) -> str:
    """What `federatls ca token` prints: a one-time token from the CA's JWK provisioner."""
    prov = json.loads(config.read_text())["authority"]["provisioners"][0]
    key = ProvisionerKey.decrypt(prov["encryptedKey"], password)
    return mint_token(
        key,
        issuer=prov["name"],
        subject=subject,
        audience=sign_audience(ca_url),
        now=datetime.now(UTC),
        sans=[subject, "127.0.0.1"],
        root_fingerprint=root_sha,
    )


async def _hello(server: Identity, client: Identity) -> str:
    """The tutorial's exchange over mutual TLS on 127.0.0.1; the server's answer."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = server.peer(writer)
        await reader.readline()
        anchor = peer.anchor.common_name if peer.anchor else "an unknown root"
        writer.write(f"Hello {peer.common_name} (cert issued by '{anchor}')\n".encode())
        await writer.drain()
        writer.close()

    listener = await streams.start_server(server, handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        reader, writer = await streams.open_connection(client, "127.0.0.1", port)
        writer.write(b"hello\n")
        await writer.drain()
        answer = (await reader.readline()).decode().strip()
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
        if not answer:  # TLS 1.3: a refused client learns it only when it reads
            raise ConnectionError("the server closed the connection without answering")
        return answer
    finally:
        listener.close()
        await listener.wait_closed()


async def run_demo(*, keep: bool = False) -> int:
    """Run the demo; 0 when every check held."""
    from .ca._pki import init_pki
    from .ca._server import CAServer

    password = secrets.token_urlsafe(24).encode()
    with tempfile.TemporaryDirectory(prefix="federatls-demo-") as tmp:
        base = Path(tmp)
        _say(1, "Two autonomous CAs, 'cloud' and 'kubernetes', each with its own root")
        now = datetime.now(UTC)
        made = {
            name: init_pki(
                name,
                base / name,
                address="127.0.0.1:0",
                password=password,
                now=now,
                dns_names=["127.0.0.1", "localhost"],
            )
            for name in ("cloud", "kubernetes")
        }
        async with (
            CAServer.running(made["cloud"].config, password) as cloud,
            CAServer.running(made["kubernetes"].config, password) as k8s,
        ):
            cas = {"cloud": cloud, "kubernetes": k8s}
            for name, ca in cas.items():
                _detail(f"{name} CA at {ca.url}, root {made[name].root_fingerprint[:16]}...")

            async def enroll(name: str, subject: str) -> Identity:
                token = _token(
                    cas[name].url, made[name].config, password, subject, made[name].root_fingerprint
                )
                return await bootstrap(token)

            _say(2, "Without federation: a cloud server refuses a kubernetes client")
            server = await enroll("cloud", "server.cloud.internal")
            client = await enroll("kubernetes", "sdk_client")
            _detail(f"server trusts: {', '.join(r.common_name for r in server.trust)}")
            try:
                await _hello(server, client)
            except (ssl.SSLError, ConnectionError, PeerNotAuthorisedError) as exc:
                _detail(f"refused, as expected ({type(exc).__name__})")
            else:
                print("FAILED: a server without federation accepted a foreign client")
                return 1

            _say(3, "Federation: each CA lists the other's root in federatedRoots, and reloads")
            for name, other in (("cloud", "kubernetes"), ("kubernetes", "cloud")):
                config = json.loads(made[name].config.read_text())
                config["federatedRoots"] = [str(made[other].root)]
                made[name].config.write_text(json.dumps(config, indent=2))
                cas[name].reload()
                _detail(f"{name} now federates {other}")

            _say(4, "New enrolments trust the federation bundle; mutual TLS across the CAs")
            server = await enroll("cloud", "server.cloud.internal")
            client = await enroll("kubernetes", "sdk_client")
            _detail(f"server trusts: {', '.join(str(r) for r in server.trust)}")
            _detail(f"client trusts: {', '.join(str(r) for r in client.trust)}")
            answer = await _hello(server, client)
            _detail(f"server answered: {answer}")
            if answer != "Hello sdk_client (cert issued by 'kubernetes Root CA')":
                print("FAILED: unexpected answer")
                return 1

            if keep:
                _say(5, "Keeping the CAs running (Ctrl-C to stop)")
                for name, ca in cas.items():
                    _detail(f"{name} CA: {ca.url}  root {made[name].root}")
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
    print("\nDemo complete: federation works both ways, and is required.")
    return 0
