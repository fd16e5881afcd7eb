"""Shipped clients: ZMQ (`zmq_client`) and gRPC (`grpc_client`), each over one or several endpoints."""
