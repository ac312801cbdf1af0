"""The federation tutorial's demo client, with federatls (no extra needed). With the CAs of
docs/quickstart.md and examples/server/server.py serving on port 8443:

    federatls ca token sdk_client --ca-url https://127.0.0.1:9001 \
        --root pki/kubernetes/certs/root_ca.crt --password-file pw.txt > client.token
    python examples/client/client.py "$(cat client.token)" https://127.0.0.1:8443 \
        --count 2 --every 1

It enrolls with the CA the token names, keeps its certificate and trust bundle renewed, and
calls the server every few seconds over mutual TLS, printing the answer. A URL that is not
https:// with a host, or a negative count or interval, is a usage error (status 2) before the
token is spent; a bad or spent token, an unreachable CA or server, or a refused handshake end
it with one line on stderr and status 1; Ctrl-C stops it quietly with status 130.
"""

import argparse
import asyncio
import sys
from collections.abc import Callable

import anyio
import httpx

import federatls
from federatls.integrations.httpx import AsyncClient


async def main(token: str, url: str, every: float, count: int) -> None:
    identity = await federatls.bootstrap(token)
    async with anyio.create_task_group() as tasks:
        live = await tasks.start(federatls.keep_renewed, identity)
        async with AsyncClient(live) as http:
            sent = 0
            while count == 0 or sent < count:
                response = await http.get(url)
                print(f"Server responded: {response.text.strip()}", flush=True)
                sent += 1
                await asyncio.sleep(every)
        tasks.cancel_scope.cancel()


def _https_url(text: str) -> str:
    """An https:// URL with a host and a valid port, checked before the token is spent."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL: {exc}") from exc
    if url.scheme != "https" or not url.host:
        raise argparse.ArgumentTypeError(f"{text!r} is not an https:// URL with a host")
    if url.port is not None and not 0 < url.port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port {url.port} is not 1 to 65535")
    return text


def _not_negative(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            number = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not number >= 0:  # NaN too
            raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
        return number

    return parse


def _cause(exc: BaseException) -> BaseException:
    """The one exception inside the task group's exception groups (``exc`` if several)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the federation tutorial's demo client")
    parser.add_argument("token", help="a one-time token from the client's CA")
    parser.add_argument("url", type=_https_url, help="the demo server, e.g. https://127.0.0.1:8443")
    parser.add_argument(
        "--every", type=_not_negative(float), default=5.0, help="seconds between calls"
    )
    parser.add_argument(
        "--count", type=_not_negative(int), default=0, help="stop after this many (0: never)"
    )
    args = parser.parse_args()
    try:
        asyncio.run(main(args.token, args.url, args.every, args.count))
    except BaseException as exc:
        cause = _cause(exc)
        if isinstance(cause, KeyboardInterrupt):  # Ctrl-C: quietly, with the shell's status
            sys.exit(130)
        if isinstance(cause, httpx.HTTPError):
            sys.exit(f"client.py: error: {args.url}: {cause}")
        if not isinstance(cause, federatls.FederatlsError | OSError):
            raise  # a bug: the whole traceback
        sys.exit(f"client.py: error: {cause}")
