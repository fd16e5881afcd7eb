"""The afternoon REST server: FastAPI + uvicorn + torch in one process, one forward per request.

``python -m bench.baselines.fastapi_torch [--model mlp] [--host H] [--port P]``: the KServe v2
``POST /v2/models/{name}/infer`` route with JSON tensors or Triton's binary-tensor extension (so the
same prebuilt request as the engine's REST front-end gets works), the model called inline in the
``async def`` handler, served by uvicorn on uvloop with httptools: what a user writes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response

from bench.baselines._common import announce, parse_args, ready, run, torch_model
from engine.dtypes import kserve_name, numpy_dtype

HEADER_LENGTH = "inference-header-content-length"


def build_app(compute: Any) -> Any:
    """The FastAPI app: one infer route around ``compute`` (numpy inputs -> (name, array) pairs)."""
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        body = await request.body()
        json_length = int(request.headers.get(HEADER_LENGTH, len(body)))
        document = orjson.loads(body[:json_length])
        inputs, at = [], json_length
        for entry in document["inputs"]:
            dtype, shape = numpy_dtype(entry["datatype"]), tuple(entry["shape"])
            size = (entry.get("parameters") or {}).get("binary_data_size")
            if size is None:
                inputs.append(np.asarray(entry["data"], dtype=dtype).reshape(shape))
            else:
                inputs.append(
                    np.frombuffer(body, dtype, count=size // dtype.itemsize, offset=at).reshape(shape)
                )
                at += size
        binary = bool((document.get("parameters") or {}).get("binary_data_output"))
        outputs, tails = [], []
        for out_name, array in compute(inputs):
            entry = {"name": out_name, "datatype": kserve_name(array.dtype), "shape": list(array.shape)}
            if binary:
                data = array.tobytes()
                entry["parameters"] = {"binary_data_size": len(data)}
                tails.append(data)
            else:
                entry["data"] = array.ravel().tolist()
            outputs.append(entry)
        header = orjson.dumps({"model_name": name, "outputs": outputs})
        if not binary:
            return Response(header, media_type="application/json")
        return Response(
            header + b"".join(tails),
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(len(header))},
        )

    return app


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its signal handlers: ours set ``stop``."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    compute = torch_model(args.model)

    async def serve(stop: asyncio.Event) -> None:
        import uvicorn

        _Server = _server_class()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(1024)
        config = uvicorn.Config(
            build_app(compute),
            loop="none",
            http="httptools",
            lifespan="off",
            log_level="warning",
            access_log=False,
            backlog=1024,
        )
        server = _Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serving.done():
                await serving  # raises what stopped it
                return
            await asyncio.sleep(0.01)
        announce("rest", args.host, sock.getsockname()[1])
        ready()
        await stop.wait()
        server.should_exit = True
        await serving

    return run(serve)


if __name__ == "__main__":
    sys.exit(main())
