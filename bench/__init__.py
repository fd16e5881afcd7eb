"""Benchmarks of the engine: `python -m bench <subcommand>` (see bench/__main__.py for the list)."""
