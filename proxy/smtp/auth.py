"""SMTP AUTH users: a file of names and salted scrypt hashes, written by ``sendguard user add``.

Format, one user per line (``#`` starts a comment)::

    alice:scrypt$16384$8$1$<salt, base64>$<hash, base64>

scrypt (RFC 7914, in the standard library) is salted and memory-hard, so a stolen file
does not give the passwords away cheaply. Checking a password costs tens of milliseconds
of CPU, so the proxy runs it in a worker thread, never on the event loop. The file is
re-read when it changes, so adding a user needs no restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

__all__ = (
    "USERNAME_RE",
    "AuthFailureTracker",
    "UserStore",
    "add_user",
    "delete_user",
    "hash_password",
    "list_users",
    "verify_password",
)

USERNAME_RE = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
_N, _R, _P = 2**14, 8, 1
# A hash that no password matches, checked for unknown users so that timing does not
# reveal which names exist.
_DUMMY = None


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64)
        expected = base64.b64decode(digest_b64)
        digest = hashlib.scrypt(
            password.encode("utf-8"),
            salt=salt,
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=128 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


@dataclass(frozen=True, slots=True)
class _Loaded:
    mtime_ns: int
    size: int
    users: dict[str, str]


def _parse(text: str) -> dict[str, str]:
    users: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        name, encoded = line.split(":", 1)
        users[name.strip()] = encoded.strip()
    return users


class UserStore:
    """The users file, re-read whenever its modification time or size changes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._loaded: _Loaded | None = None

    def _current(self) -> dict[str, str]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._loaded = None
            return {}
        loaded = self._loaded
        if loaded is None or loaded.mtime_ns != stat.st_mtime_ns or loaded.size != stat.st_size:
            loaded = _Loaded(stat.st_mtime_ns, stat.st_size, _parse(self.path.read_text(encoding="utf-8")))
            self._loaded = loaded
        return loaded.users

    def __contains__(self, name: str) -> bool:
        return name in self._current()

    def __len__(self) -> int:
        return len(self._current())

    def check(self, name: str, password: str) -> bool:
        """Blocking (scrypt): call from a worker thread."""
        global _DUMMY
        encoded = self._current().get(name)
        if encoded is None:
            if _DUMMY is None:
                _DUMMY = hash_password(secrets.token_hex(16))
            verify_password(password, _DUMMY)
            return False
        return verify_password(password, encoded)


def add_user(path: str, name: str, password: str) -> bool:
    """Add or replace a user; returns True when the user was new. Written atomically, mode 0600."""
    if not USERNAME_RE.match(name):
        raise ValueError("user names are 1 to 128 characters of letters, digits and . _ @ + -")
    if not password:
        raise ValueError("the password must not be empty")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = target.read_text(encoding="utf-8").splitlines() if target.exists() else []
    entry = f"{name}:{hash_password(password)}"
    new = True
    out: list[str] = []
    for line in lines:
        if line.split(":", 1)[0].strip() == name and not line.lstrip().startswith("#"):
            out.append(entry)
            new = False
        else:
            out.append(line)
    if new:
        out.append(entry)
    _write_users(target, out)
    return new


def list_users(path: str) -> list[str]:
    """The user names in the file, in its order (no hashes)."""
    target = Path(path)
    return list(_parse(target.read_text(encoding="utf-8"))) if target.exists() else []


def delete_user(path: str, name: str) -> bool:
    """Remove a user; False when there was none. The running proxy sees the change at its next
    AUTH (the file is re-read when it changes)."""
    target = Path(path)
    if not target.exists():
        return False
    lines = target.read_text(encoding="utf-8").splitlines()
    out = [line for line in lines if line.lstrip().startswith("#") or line.split(":", 1)[0].strip() != name]
    if len(out) == len(lines):
        return False
    _write_users(target, out)
    return True


def _write_users(target: Path, lines: list[str]) -> None:
    """Atomically, mode 0600: a crash leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".users.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AuthFailureTracker:
    """Failed AUTH attempts per client in a sliding window (Postfix anvil's auth rate).

    IPv6 clients are counted per /64 (one host can use a whole /64); the table is swept as
    it goes and capped, so an attacker rotating addresses cannot make it grow without bound.
    """

    max_clients = 100_000

    def __init__(self, limit: int, window: float = 600.0) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}
        self._swept = time.monotonic()

    @staticmethod
    def _key(ip: str) -> str:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        if address.version == 6 and address.ipv4_mapped is None:
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return str(address.ipv4_mapped or address) if address.version == 6 else str(address)

    def _prune(self, key: str, now: float) -> deque[float]:
        events = self._failures.get(key)
        if events is None:
            return deque()
        while events and now - events[0] > self.window:
            events.popleft()
        if not events:
            del self._failures[key]
            return deque()
        return events

    def _sweep(self, now: float) -> None:
        if now - self._swept < self.window and len(self._failures) < self.max_clients:
            return
        self._swept = now
        for key in list(self._failures):
            self._prune(key, now)
        while len(self._failures) >= self.max_clients:  # still full: forget the oldest
            del self._failures[next(iter(self._failures))]

    def blocked(self, ip: str) -> bool:
        return len(self._prune(self._key(ip), time.monotonic())) >= self.limit

    def failed(self, ip: str) -> None:
        now = time.monotonic()
        self._sweep(now)
        key = self._key(ip)
        events = self._prune(key, now)
        events.append(now)
        self._failures[key] = events
