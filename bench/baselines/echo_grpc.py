"""The protocol floor: a bare grpc.aio KServe ModelInfer on uvloop answering its inputs as outputs.

``python -m bench.baselines.echo_grpc [--host H] [--port P]``: parses each request (protobuf), and
answers ``OUTPUTn`` = ``INPUTn``; no model, no batching, one process. What gRPC in Python costs.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from bench.baselines._common import parse_args, run
from bench.baselines._grpc import serve_model_infer


def echo(inputs: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """``OUTPUTn`` = ``INPUTn``."""
    return [(f"OUTPUT{i}", x) for i, x in enumerate(inputs)]


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], model=False)

    async def serve(stop: asyncio.Event) -> None:
        await serve_model_infer(args.host, args.port, echo, stop)

    return run(serve)


if __name__ == "__main__":
    sys.exit(main())
