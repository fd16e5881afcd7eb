"""Clients shipped with the engine: `ZmqClient` and `AsyncZmqClient` for the ZMQ protocol."""
