"""Clients shipped with the engine: ZMQ (`zmq_client`) and gRPC (`grpc_client`), each over one or several endpoints."""
