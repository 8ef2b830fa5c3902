"""Logging setup: plain text or one JSON object per line, with the session id where one is known.

The session id travels in a context variable set by the connection handler, so every log line
written while serving a connection (in its task, or tasks it starts) carries it without passing it
around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from dataclasses import dataclass

current_session: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_session", default=None)


class _SessionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = current_session.get()
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "session_id"?, "exc"?}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        session_id = getattr(record, "session_id", None)
        if session_id:
            entry["session_id"] = session_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        session_id = getattr(record, "session_id", None)
        return f"{text} [session {session_id}]" if session_id else text


@dataclass(frozen=True)
class LoggingSettings:
    """The ``logging`` section of the server's settings.

    Attributes:
        log_transcripts: log final texts at INFO (off: transcripts are personal data).
        log_format: ``text``, or ``json`` (one object per line, with ``session_id`` where known).
        log_level: the root logger's level.
    """

    log_transcripts: bool = False
    log_format: str = "text"
    log_level: str = "INFO"


def configure_logging(level: str = LoggingSettings.log_level, fmt: str = LoggingSettings.log_format,
                      stream=None) -> None:
    """Install one handler on the root logger (replacing earlier ones)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_SessionFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
