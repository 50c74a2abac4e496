"""Logging: one JSON object per line on stderr, ours (structlog) and mitmproxy's (stdlib) alike."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import structlog


def utc_iso_timestamp(_logger: Any, _name: str, event_dict: Any) -> Any:
    """`timestamp` as structlog's TimeStamper(fmt="iso", utc=True) writes it (microseconds
    dropped when zero, "Z" for UTC), with the date and time of day formatted once per second:
    every request writes a decision line."""
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    micros = nanos // 1000
    if _second[0] != seconds:
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second[0] = seconds
    event_dict["timestamp"] = f"{_second[1]}.{micros:06d}Z" if micros else f"{_second[1]}Z"
    return event_dict


_second: list[Any] = [None, ""]


def _fallback(obj: Any) -> Any:
    """structlog's JSON fallback: an object's __structlog__(), else its repr()."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


# One encoder for every line: json.dumps(..., default=...) builds a new encoder per call.
_ENCODER = json.JSONEncoder(default=_fallback)


def _dumps(obj: Any, **_kw: Any) -> str:
    return _ENCODER.encode(obj)


_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    utc_iso_timestamp,
]


class LogStream:
    """stderr for log lines: a line that cannot be written (its reader went away: a closed
    pipe, a log shipper that died; a full disk) is dropped, never raised into the
    code that logged it. A drain whose first log line raised BrokenPipeError used to end there,
    and the gateway then ignored every SIGTERM."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except (OSError, ValueError):  # ValueError: the stream was closed
            return 0

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass


def configure(level: str = "INFO") -> None:
    renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    stream = LogStream(sys.stderr)
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(file=stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # mitmproxy reports every client and server connection at INFO; only problems matter here.
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
