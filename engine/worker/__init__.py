"""The worker process: one per device, it batches requests from shared memory and runs the models."""
