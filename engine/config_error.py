"""`ConfigError`, the one error of every config source, and `main_exit_on_error`, which reports it.

The message is one line naming the key, the value, where it came from and how to fix it; values of
`SECRET_KEYS` never appear in it.
"""

from __future__ import annotations

import functools
import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar

#: Keys whose values never appear in error messages or `EngineConfig.as_dict()`.
SECRET_KEYS = frozenset({"auth_tokens"})


class ConfigError(ValueError):
    """A config value is invalid or a key is unknown.

    Attributes:
        key: the config key (or the unknown name as written: ``ENGINE_GRPC_PROT``, ``--set`` key...).
        value: the offending value (redacted for secret keys).
        reason: what is wrong and how to fix it.
        source: where the value came from (``environment ENGINE_GRPC_PORT``, ``file x.yaml``...), or "".
    """

    def __init__(self, key: str, value: object, reason: str, source: str = "") -> None:
        self.key = key
        self.value = "<redacted>" if key in SECRET_KEYS else value
        self.reason = reason
        self.source = source
        where = f" (from {source})" if source else ""
        super().__init__(f"config error: {key}={self.value!r}{where}: {reason}")

    def with_source(self, source: str) -> ConfigError:
        """The same error, saying where the value came from (unless it already does)."""
        if self.source or not source:
            return self
        return ConfigError(self.key, self.value, self.reason, source)


_F = TypeVar("_F", bound=Callable[..., Any])


def main_exit_on_error(main: _F) -> _F:
    """Decorate a ``main()``: a `ConfigError` prints one line on stderr and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except ConfigError as err:
            print(f"engine: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return typing.cast(_F, wrapper)
