"""A minimal unary gRPC echo service on 127.0.0.1 (grpc.aio, as the agent and replicas use), for the loopback
round trip of benchmark 2's floor. ``python -m benchmarks._echo`` serves and prints its port; ``round_trips``
times calls from another process."""

import asyncio
import sys
import time
from typing import List

import grpc

METHOD = "/bench.Echo/Echo"


async def serve() -> None:
    async def echo(request: bytes, context) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await server.stop(0)


async def round_trips(port: int, n: int, warmup: int = 100, size: int = 200) -> List[float]:
    payload = b"x" * size
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD)
        for _ in range(warmup):
            await call(payload)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            reply = await call(payload)
            times.append(time.perf_counter() - started)
            assert reply == payload
        return times


if __name__ == "__main__":
    asyncio.run(serve())
