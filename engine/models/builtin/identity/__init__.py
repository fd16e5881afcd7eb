"""Built-in model `identity`: returns its FP32 input."""
