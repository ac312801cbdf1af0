"""The federation tutorial's demo server, with federatls (and aiohttp: the `aiohttp` extra,
`pip install -e '.[aiohttp]'` from a clone). With a CA made as docs/quickstart.md shows:

    federatls ca token 127.0.0.1 --ca-url https://127.0.0.1:9000 \
        --root pki/cloud/certs/root_ca.crt --password-file pw.txt > server.token
    python examples/server/server.py "$(cat server.token)" --port 8443

It enrolls with the CA the token names, keeps its certificate and trust bundle renewed, and
answers every mutually authenticated client with its name and the root that vouched for it.
A port out of range is a usage error (status 2) before the token is spent; a bad or spent
token, an unreachable CA or a busy port end it with one line on stderr and status 1; Ctrl-C
stops it quietly with status 130.
"""

import argparse
import asyncio
import sys
from datetime import UTC, datetime

import anyio
from aiohttp import web

import federatls
from federatls.integrations.aiohttp import Site


async def main(token: str, port: int) -> None:
    identity = await federatls.bootstrap(token)
    async with anyio.create_task_group() as tasks:
        live = await tasks.start(federatls.keep_renewed, identity)
        print("Server is using federated root certificates")
        for root in live.current.trust:
            print(f"Accepting certs anchored in {root.subject}")

        async def hello(request: web.Request) -> web.Response:
            peer = live.peer(request)
            issuer = peer.anchor.common_name if peer.anchor else "?"
            now = datetime.now(UTC)
            return web.Response(
                text=f"Hello {peer.common_name} (cert issued by '{issuer}') at {now}\n"
            )

        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        site = Site(runner, live, "127.0.0.1", port)
        await site.start()
        print(f"Listening on :{site.port} ...", flush=True)
        roots = {root.fingerprint for root in live.current.trust}
        async for renewed in live.updates():
            print(f"Renewed: serial {renewed.serial}, valid until {renewed.not_after}", flush=True)
            if {root.fingerprint for root in renewed.trust} != roots:
                roots = {root.fingerprint for root in renewed.trust}
                for root in renewed.trust:
                    print(f"Now accepting certs anchored in {root.subject}", flush=True)


def _port(text: str) -> int:
    """A TCP port (0: any free one), checked before the token is spent."""
    if not (text.isascii() and text.isdigit()) or not 0 <= (port := int(text)) <= 65535:
        raise argparse.ArgumentTypeError(f"port {text} is not between 0 and 65535")
    return port


def _cause(exc: BaseException) -> BaseException:
    """The one exception inside the task group's exception groups (``exc`` if several)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the federation tutorial's demo server")
    parser.add_argument("token", help="a one-time token from the server's CA")
    parser.add_argument("--port", type=_port, default=8443)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.token, args.port))
    except BaseException as exc:
        cause = _cause(exc)
        if isinstance(cause, KeyboardInterrupt):  # Ctrl-C: quietly, with the shell's status
            sys.exit(130)
        if not isinstance(cause, federatls.FederatlsError | OSError):
            raise  # a bug: the whole traceback
        sys.exit(f"server.py: error: {cause}")
