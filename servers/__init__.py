"""Front-end processes (gRPC, REST, ZMQ), the shared-memory gateway they submit through, and clients.

Nothing under this package imports torch.
"""
