"""The standard ``grpc.health.v1.Health`` service of the gRPC front-end, answered from the gateway.

Service names: ``""`` and ``inference.GRPCInferenceService`` mean the whole server (SERVING while the
gateway admits requests); a model name means that model (SERVING while a worker serving it is up).
Any other name is unknown: Check answers NOT_FOUND and Watch sends SERVICE_UNKNOWN, as the health
protocol asks (https://github.com/grpc/grpc/blob/master/doc/health-checking.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.errors import NotFound
from servers.gateway_api import Gateway

#: The full name of the inference service, accepted as a health service name like "".
INFERENCE_SERVICE = "inference.GRPCInferenceService"

#: How often a Watch re-reads the status (the gateway has no change notification to wait on).
WATCH_INTERVAL_S = 1.0


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Check, List and Watch, computed from the gateway at each call (no status table to keep)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def status(self, service: str) -> int | None:
        """The serving status of a service name, or None when the name is unknown."""
        gateway = self._gateway
        if service in ("", INFERENCE_SERVICE):
            ready = gateway.is_ready()
        else:
            try:
                ready = gateway.is_ready() and gateway.model_ready(service)
            except NotFound:
                return None
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for service in ("", INFERENCE_SERVICE, *self._gateway.model_names()):
            status = self.status(service)
            if status is not None:
                response.statuses[service].status = status
        return response

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        # Runs until the client cancels (or the server stops): sends the status now and on each change.
        last = None
        while True:
            status = self.status(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await asyncio.sleep(WATCH_INTERVAL_S)
