"""The federation tutorial's demo client, with federatls.

    python examples/client/client.py "$(federatls ca token sdk_client --ca-url ... --root ...)" \
        https://127.0.0.1:8443

It enrolls with the CA the token names, keeps its certificate and trust bundle renewed, and
calls the server every few seconds over mutual TLS, printing the answer.
"""

import argparse
import asyncio

import anyio

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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the federation tutorial's demo client")
    parser.add_argument("token", help="a one-time token from the client's CA")
    parser.add_argument("url", help="the demo server, e.g. https://127.0.0.1:8443")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between calls")
    parser.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    args = parser.parse_args()
    asyncio.run(main(args.token, args.url, args.every, args.count))
