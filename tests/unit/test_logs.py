"""Structured logs: one parseable JSON object per record, with role, event, extras and the request id."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import warnings
from collections.abc import Iterator

import orjson
import pytest

from engine.logs import JsonFormatter, request_id, resolve_format, setup_logging


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level restored after the test (setup_logging replaces them)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def _json_logger(stream: io.StringIO, role: str = "frontend rest#0") -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(role))
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_each_record_is_one_json_object_with_role_event_and_extras() -> None:
    stream = io.StringIO()
    logger = _json_logger(stream)
    logger.info("loaded model %s", "mlp", extra={"event": "model_load", "model": "mlp", "rows": 3})
    logger.warning("plain %d", 7)
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("failed")
    first, second, third = _lines(stream)
    assert first["msg"] == "loaded model mlp"
    assert (first["event"], first["model"], first["rows"], first["level"]) == ("model_load", "mlp", 3, "INFO")
    assert first["role"] == "frontend rest#0" and first["logger"] == logger.name
    assert isinstance(first["pid"], int) and str(first["ts"]).endswith("+00:00")
    assert "request_id" not in first  # outside a request
    assert (second["event"], second["level"]) == ("log", "WARNING")
    # an error names its event, and its traceback stays inside the one line
    assert third["event"] == "error" and "ValueError: bad\nthing" in str(third["exc"])
    assert len(stream.getvalue().splitlines()) == 3


def test_odd_extra_values_do_not_lose_the_record() -> None:
    stream = io.StringIO()
    _json_logger(stream).info("x", extra={"thing": object(), "path": b"\xff"})
    (line,) = _lines(stream)
    assert line["msg"] == "x" and "object" in str(line["thing"])


def test_request_id_follows_each_asyncio_task() -> None:
    stream = io.StringIO()
    logger = _json_logger(stream)

    async def handle(rid: str) -> None:
        request_id.set(rid)
        await asyncio.sleep(0)  # interleave with the other request
        logger.info("handling")

    async def main() -> None:
        await asyncio.gather(handle("req-a"), handle("req-b"))
        logger.info("outside")

    asyncio.run(main())
    ids = [line.get("request_id") for line in _lines(stream)]
    assert sorted(ids[:2]) == ["req-a", "req-b"] and ids[2] is None  # type: ignore[type-var]


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    assert resolve_format("auto", _Tty()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("text", io.StringIO()) == "text"
    assert resolve_format("json", _Tty()) == "json"
    with pytest.raises(ValueError, match="xml"):
        resolve_format("xml")


def test_setup_logging_json_covers_warnings(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging("INFO", "worker cpu", "json")
    logging.getLogger("engine.test").debug("hidden")
    logging.getLogger("engine.test").info("shown", extra={"event": "ready"})
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    lines = _lines(stream)
    assert lines[0]["msg"] == "shown"
    assert lines[0]["role"] == "worker cpu" and lines[0]["event"] == "ready"
    assert "deprecated thing" in str(lines[1]["msg"]) and lines[1]["logger"] == "py.warnings"


def test_setup_logging_text_keeps_the_readable_format(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging("INFO", "supervisor", "text")
    logging.getLogger("engine.supervisor").info("started %s", "worker cpu")
    assert stream.getvalue().rstrip().endswith("INFO [supervisor] engine.supervisor: started worker cpu")
