"""The model repository: specs (`spec`), the YAML loader (`repository`), backends and the built-in models.

Importing this package is cheap and torch-free: `backends` (which imports torch) is only imported by
worker processes.
"""

from __future__ import annotations

from pathlib import Path

_BUILTIN = Path(__file__).resolve().parent / "builtin"


def builtin_repository() -> Path:
    """The folder holding the built-in demo models (`simple`, `identity`, `mlp`)."""
    return _BUILTIN
