"""What the baseline servers share: the command line, the model call, the launch protocol, the loop."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np


def parse_args(
    description: str, argv: Sequence[str] | None = None, *, model: bool = True
) -> argparse.Namespace:
    """``--host``, ``--port`` (0: any free port) and, for the servers that compute, ``--model``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    if model:
        parser.add_argument("--model", default="mlp", help="a built-in model (default mlp)")
    return parser.parse_args(argv)


def torch_model(name: str) -> Callable[[list[np.ndarray]], list[tuple[str, np.ndarray]]]:
    """The built-in model ``name`` on this process's CPU, called on numpy inputs per request; it
    returns ``(output name, array)`` pairs.

    Uses `engine.models.backends.load_model` (the same factory and weights the engine loads) and
    calls it as an afternoon server would: one request, one forward, under ``torch.inference_mode``.
    """
    import torch

    from engine.models import builtin_repository
    from engine.models.backends import load_model
    from engine.models.repository import load_repository

    spec = load_repository(builtin_repository()).specs[name]
    model = load_model(spec, "cpu")
    model.warmup()
    names = [o.name for o in spec.outputs]

    def call(inputs: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
        # np.array: a writable copy of the request's (read-only) bytes, as torch wants
        outputs = model.run([torch.from_numpy(np.array(x)) for x in inputs])
        return [(n, t.numpy()) for n, t in zip(names, outputs, strict=True)]

    return call


def announce(protocol: str, host: str, port: int) -> None:
    """The launch protocol's endpoint line."""
    print(f"{protocol:5s} listening on {host}:{port}", flush=True)


def ready() -> None:
    """The launch protocol's last line."""
    print("ready", flush=True)


def run(main: Callable[[asyncio.Event], Awaitable[Any]]) -> int:
    """Run ``main(stop)`` on uvloop; SIGTERM and SIGINT set ``stop``."""
    import uvloop

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    uvloop.run(wrapper())
    return 0
