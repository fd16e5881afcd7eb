"""Built-in model `mlp`: a fixed-seed 256-2048-256 ReLU MLP, a small compute-bound load."""
