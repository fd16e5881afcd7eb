"""The servers the engine is compared with, each a ``python -m bench.baselines.<name>`` program.

- `echo_grpc`: a bare grpc.aio KServe ModelInfer on uvloop that answers its inputs: the protocol floor.
- `grpc_torch`: a plain grpc.aio KServe ModelInfer that runs the torch model per request, in one
  process (the gRPC server a user would write in an afternoon).
- `fastapi_torch`: FastAPI + uvicorn with the KServe v2 HTTP infer route (JSON and binary tensors),
  running the torch model per request in one process (the REST server of an afternoon).
- `inproc`: not a server: the model called in the benchmark's own process with ideal batching and
  no transport at all, the compute floor (`inproc.measure_inproc`).

Every server speaks the launch protocol on stdout (``<proto> listening on <host>:<port>``, then
``ready``), binds port 0 by default and stops on SIGTERM, so `bench.load_server.launched` runs them.
"""
