"""The one KServe ModelInfer handler both gRPC baselines serve, around a function on numpy inputs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import numpy as np

from engine.dtypes import kserve_name, numpy_dtype
from protos import grpc_service_pb2 as pb

#: numpy inputs in request order -> numpy outputs in the response's order, with their names.
Compute = Callable[[list[np.ndarray]], list[tuple[str, np.ndarray]]]


async def serve_model_infer(host: str, port: int, compute: Compute, stop: asyncio.Event) -> None:
    """A grpc.aio server with just ``inference.GRPCInferenceService/ModelInfer``, until ``stop``."""
    from bench.baselines._common import announce, ready

    async def model_infer(
        request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        inputs = [
            np.frombuffer(raw, dtype=numpy_dtype(spec.datatype)).reshape(tuple(spec.shape))
            for spec, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        ]
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, array in compute(inputs):
            response.outputs.add(name=name, datatype=kserve_name(array.dtype), shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                model_infer,
                request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelInferResponse.SerializeToString,
            )
        },
    )
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    announce("grpc", host, bound)
    ready()
    await stop.wait()
    await server.stop(1.0)
