"""Structured logs on stdout (JSON or logfmt) and the audit log file.

Both go through a queue to a writer thread, so a slow terminal or disk never blocks the
event loop. Log records carry their structured fields in ``record.fields`` (pass
``extra={"fields": {...}}``); credentials never reach a record (aiosmtpd's own wire log,
which would show AUTH exchanges at debug level, is kept at WARNING).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import logging.handlers
import os
import queue
import sys
import time
from typing import Any, TextIO

__all__ = ("AuditLog", "JsonFormatter", "LogfmtFormatter", "configure_logging", "stop_logging")

_listener: logging.handlers.QueueListener | None = None
#: Fields on every line of this process (a worker's number and pid, proxy/supervisor.py).
_process_fields: dict[str, Any] = {}


def _base(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
        **_process_fields,
    }
    fields = getattr(record, "fields", None)
    if isinstance(fields, dict):
        out.update(fields)
    if record.exc_info:
        out["error"] = logging.Formatter().formatException(record.exc_info)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_base(record), ensure_ascii=False, default=str)


def _logfmt_value(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, ensure_ascii=False, default=str)
    text = "" if value is None else str(value)
    if text and all(c.isalnum() or c in "._-:/@+<>[]" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in _base(record).items() if value is not None)


def configure_logging(
    fmt: str = "logfmt", level: str = "info", stream: TextIO | None = None, fields: dict[str, Any] | None = None
) -> None:
    """Route every sendguard log line through one queue to stdout; ``fields`` go on every line."""
    global _listener
    stop_logging()
    _process_fields.clear()
    _process_fields.update(fields or {})
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    log_queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(logging.handlers.QueueHandler(log_queue))
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO and the wire at DEBUG; keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _listener = logging.handlers.QueueListener(log_queue, handler, respect_handler_level=True)
    _listener.start()


def stop_logging() -> None:
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


#: The audit log names people and what was decided about their mail: the owner writes it, its
#: group (a log shipper) may read it, nobody else (AVG art. 32).
AUDIT_FILE_MODE = 0o640


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating file handler whose files (the first and every rotated one) are created
    with ``AUDIT_FILE_MODE``, and whose existing file loses any access by others."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, AUDIT_FILE_MODE)
        with contextlib.suppress(OSError):  # not ours to change: leave it, still write
            mode = os.fstat(fd).st_mode & 0o777
            if mode & 0o007:
                os.fchmod(fd, mode & ~0o007)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


class _SharedRotatingFileHandler(_PrivateRotatingFileHandler):
    """The same file written by several worker processes (proxy/supervisor.py).

    Each line is one ``write()`` on an ``O_APPEND`` descriptor, so lines never interleave;
    rotating is what needs care: every write holds an ``flock`` on ``PATH.lock`` while it
    checks the size, rotates and writes, and first reopens the file when another process has
    rotated it (the path names another inode), so no process keeps writing into ``PATH.1``
    and no rotation happens twice.
    """

    def __init__(self, filename: str, maxBytes: int, backupCount: int, encoding: str) -> None:
        super().__init__(filename, maxBytes=maxBytes, backupCount=backupCount, encoding=encoding)
        self._lock_fd = os.open(self.baseFilename + ".lock", os.O_WRONLY | os.O_CREAT, AUDIT_FILE_MODE)

    def emit(self, record: logging.LogRecord) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if self.stream is not None:
                try:
                    current = os.stat(self.baseFilename).st_ino
                except FileNotFoundError:
                    current = -1
                if current != os.fstat(self.stream.fileno()).st_ino:
                    self.stream.close()
                    self.stream = self._open()
            super().emit(record)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


class AuditLog:
    """One JSON line per transaction, flushed per line, rotated by size.

    This is the record an administrator shows a regulator: what was decided, by which
    policy, on what basis, and what the upstream said.
    """

    def __init__(self, path: str | None, max_size: int, keep: int, *, shared: bool = False) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener: logging.handlers.QueueListener | None = None
        self._logger = logging.Logger(f"sendguard.audit.{id(self)}")
        self._logger.propagate = False
        if path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kind = _SharedRotatingFileHandler if shared else _PrivateRotatingFileHandler
        handler = kind(path, maxBytes=max_size, backupCount=keep, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._listener.start()

    def write(self, entry: dict[str, Any]) -> None:
        if self._listener is None:
            return
        line = json.dumps(entry, ensure_ascii=False, default=str, separators=(",", ":"))
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            # A header with raw 8-bit bytes (a Message-ID, an address) reaches us as lone
            # surrogates, which the UTF-8 file refuses: the whole line would be lost. Written as
            # the bytes they stand for, read as UTF-8 (U+FFFD where they are not).
            line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        self._logger.info("%s", line)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()  # drains the queue first
            for handler in self._listener.handlers:
                handler.close()
            self._listener = None
