"""The afternoon gRPC server: plain grpc.aio + torch in one process, one forward per request.

``python -m bench.baselines.grpc_torch [--model mlp] [--host H] [--port P]``: KServe ModelInfer,
the model called inline in the handler (no batching, no worker process): what a user writes first.
"""

from __future__ import annotations

import asyncio
import sys

from bench.baselines._common import parse_args, run, torch_model
from bench.baselines._grpc import serve_model_infer


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    compute = torch_model(args.model)

    async def serve(stop: asyncio.Event) -> None:
        await serve_model_infer(args.host, args.port, compute, stop)

    return run(serve)


if __name__ == "__main__":
    sys.exit(main())
