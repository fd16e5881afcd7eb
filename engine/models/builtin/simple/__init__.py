"""Built-in model `simple`: Triton's classic add/sub example."""
