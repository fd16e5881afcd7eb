"""Multiprocess shared-memory inference engine: supervisor, config, workers and the model repository."""
