"""``federatls demo``: the federation tutorial on one machine.

Two autonomous CAs ("cloud" and "kubernetes") are made in a temporary directory and started;
each lists the other's root in ``federatedRoots``; a workload enrolled with each CA then
talks mutual TLS to the other, trusting the federation bundle. Everything is cleaned up at the
end unless ``--keep`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from ._client import CAClient, fetch_root
from ._jwk import ProvisionerKey
from ._keys import PrivateKey, build_csr, new_private_key
from ._protocol import SignRequest
from ._sslkeys import load_cert_chain_in_memory
from ._token import mint_token, sign_audience
from ._x509 import certs_to_pem, common_name, fingerprint

__all__ = ["run_demo"]


def _say(step: int, text: str) -> None:
    print(f"\n[{step}] {text}", flush=True)


def _detail(text: str) -> None:
    print(f"    {text}", flush=True)


async def _enroll(
    url: str, config: Path, password: bytes, subject: str
) -> tuple[list[x509.Certificate], PrivateKey, x509.Certificate]:
    """Mint a token from the CA's ca.json, bootstrap on its root fingerprint, get a cert."""
    data = json.loads(config.read_text())
    prov = data["authority"]["provisioners"][0]
    key = ProvisionerKey.decrypt(prov["encryptedKey"], password)
    root_pem = Path(data["root"]).read_bytes()
    root_sha = fingerprint(x509.load_pem_x509_certificate(root_pem))
    token = mint_token(
        key,
        issuer=prov["name"],
        subject=subject,
        audience=sign_audience(url),
        now=datetime.now(UTC),
        sans=[subject, "127.0.0.1"],
        root_fingerprint=root_sha,
    )
    root = await fetch_root(url, root_sha)
    leaf_key = new_private_key()
    async with CAClient(url, [root]) as ca:
        answer = await ca.sign(
            SignRequest(build_csr(leaf_key, subject, [subject, "127.0.0.1"]), token)
        )
    return list(answer.chain), leaf_key, root


def _context(
    purpose: ssl.Purpose,
    chain: Sequence[x509.Certificate],
    key: PrivateKey,
    trust: Sequence[x509.Certificate],
) -> ssl.SSLContext:
    side = (
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=certs_to_pem(trust))
    load_cert_chain_in_memory(ctx, chain, key)
    return ctx


async def _mtls_exchange(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str:
    """One request over mutual TLS on 127.0.0.1; returns the server's answer."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sslobj = writer.get_extra_info("ssl_object")
        peer = x509.load_der_x509_certificate(sslobj.getpeercert(binary_form=True))
        await reader.readline()
        writer.write(f"Hello {common_name(peer.subject)}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        writer.write(b"hi\n")
        await writer.drain()
        answer = (await reader.readline()).decode().strip()
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
        if not answer:  # TLS 1.3: a refused client learns it only when it reads
            raise ConnectionError("the server closed the connection without answering")
        return answer
    finally:
        server.close()
        await server.wait_closed()


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
        for name, result in made.items():
            _detail(f"{name}: root fingerprint {result.root_fingerprint}")

        _say(2, "Federation: each CA lists the other's root under federatedRoots")
        for name, other in (("cloud", "kubernetes"), ("kubernetes", "cloud")):
            config = json.loads(made[name].config.read_text())
            config["federatedRoots"] = [str(made[other].root)]
            made[name].config.write_text(json.dumps(config, indent=2))
            _detail(f"{name} federates {other}")

        async with (
            CAServer.running(made["cloud"].config, password) as cloud,
            CAServer.running(made["kubernetes"].config, password) as k8s,
        ):
            _say(3, "Both CAs serve HTTPS on loopback")
            for name, ca in (("cloud", cloud), ("kubernetes", k8s)):
                _detail(f"{name} CA at {ca.url}")
                root = await fetch_root(ca.url, made[name].root_fingerprint)
                async with CAClient(ca.url, [root]) as client:
                    bundle = await client.federation()
                names = sorted(common_name(c.subject) for c in bundle)
                _detail(f"{name} /federation: {', '.join(names)}")
                if len(bundle) != 2:
                    print("FAILED: the federation bundle should hold both roots")
                    return 1

            _say(4, "A server enrolled with cloud, a client enrolled with kubernetes")
            s_chain, s_key, s_root = await _enroll(
                cloud.url, made["cloud"].config, password, "server.cloud.internal"
            )
            c_chain, c_key, c_root = await _enroll(
                k8s.url, made["kubernetes"].config, password, "sdk_client"
            )
            async with CAClient(cloud.url, [s_root]) as client:
                cloud_fed = await client.federation()
            async with CAClient(k8s.url, [c_root]) as client:
                k8s_fed = await client.federation()
            _detail(f"server certificate: {common_name(s_chain[0].subject)} from cloud")
            _detail(f"client certificate: {common_name(c_chain[0].subject)} from kubernetes")

            _say(5, "Without federation (own roots only) the server refuses the client")
            try:
                await _mtls_exchange(
                    _context(ssl.Purpose.CLIENT_AUTH, s_chain, s_key, [s_root]),
                    _context(ssl.Purpose.SERVER_AUTH, c_chain, c_key, k8s_fed),
                )
            except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
                _detail(f"refused, as expected: {type(exc).__name__}")
            else:
                print("FAILED: a non-federated server accepted a foreign client")
                return 1

            _say(6, "With the federation bundles, mutual TLS works across the two CAs")
            answer = await _mtls_exchange(
                _context(ssl.Purpose.CLIENT_AUTH, s_chain, s_key, cloud_fed),
                _context(ssl.Purpose.SERVER_AUTH, c_chain, c_key, k8s_fed),
            )
            _detail(f"server answered: {answer}")
            if answer != "Hello sdk_client":
                print("FAILED: unexpected answer")
                return 1

            if keep:
                _say(7, "Keeping the CAs running (Ctrl-C to stop)")
                _detail(f"cloud CA: {cloud.url}  root {made['cloud'].root}")
                _detail(f"kubernetes CA: {k8s.url}  root {made['kubernetes'].root}")
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
    print("\nDemo complete: federation works both ways, and is required.")
    return 0
