"""Where accepted mail goes: an upstream MTA over SMTP, or a local Maildir.

Both speak the same small interface so the handler can relay in lockstep: ``open`` a
session when the client says MAIL, relay ``mail``, each ``rcpt`` and ``data``, then
``finish`` (the connection goes back to the pool) or ``abort`` (RSET, or close when the
connection is in doubt).

Every outcome is a ``Reply``. Upstream text is relayed (so a sender learns why the real
server refused), cleaned of control characters; our own failures are generic 451 replies
with the transaction id and never show host names, ports or exception text (Postfix's
before-queue proxy does the same "for privacy reasons").
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPStatus

from policies.base import Reply
from proxy.config.settings import UpstreamConfig
from proxy.relay.rawmsg import Outgoing, stuffed_blocks
from proxy.relay.trace import Hop, xforward_attributes
from proxy.replies import (
    r451_internal,
    r451_upstream_auth_refused,
    r451_upstream_busy,
    r451_upstream_lost,
    r451_upstream_tls_failed,
    r451_upstream_unavailable,
)

__all__ = (
    "Capabilities",
    "MaildirUpstream",
    "SmtpUpstream",
    "Upstream",
    "UpstreamSession",
    "UpstreamUnavailable",
    "build_upstream",
    "reply_from_upstream",
)

log = logging.getLogger("sendguard.upstream")

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class Capabilities:
    smtputf8: bool = True
    eightbitmime: bool = True
    size: int | None = None
    #: RFC 3461: the upstream takes NOTIFY, ORCPT, RET and ENVID and reports as they ask.
    dsn: bool = False
    #: The XFORWARD attributes the upstream offers to this client (Postfix's
    #: smtpd_authorized_xforward_hosts lists sendguard); empty: none.
    xforward: frozenset[str] = frozenset()


class UpstreamUnavailable(Exception):
    """No upstream session could be opened; ``reply`` says what the client gets."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.line())
        self.reply = reply


_DEFAULT_SUCCESS = {"mail": "2.1.0", "rcpt": "2.1.5"}


def reply_from_upstream(code: int, message: str, *, stage: str, txn_id: str) -> Reply:
    """An upstream reply as a client reply: same code class, the upstream's own words.

    Replies that make no sense at this stage (1xx, 3xx, a 2xx where none belongs) become a
    generic 451, as Postfix's before-queue proxy replaces unexpected replies (T5).
    """
    valid = {2, 4, 5}
    if code // 100 not in valid or code > 599:
        log.warning("txn %s: unexpected upstream reply %s at %s", txn_id, code, stage)
        return r451_internal(txn_id)
    sent = code
    if code == 421:
        # The upstream is closing *its* connection; ours with the client is fine, and a 421
        # would tell the client we are closing (RFC 5321 3.8). Same meaning, minus that.
        code = 451
    # Printable ASCII only: a Latin-1 reply decoded with surrogateescape would crash the reply
    # to our client, and a client that did not ask for SMTPUTF8 expects ASCII anyway.
    text = _CONTROL.sub(" ", message).encode("ascii", "replace").decode("ascii").strip()
    match = _ENHANCED.match(text)
    if match and int(match.group(1)) == code // 100:
        status = f"{match.group(1)}.{match.group(2)}.{match.group(3)}"
        text = text[match.end() :]
    else:
        # RFC 3463 3.2/3.3: a success at MAIL is 2.1.0 (sender), at RCPT 2.1.5 (destination);
        # elsewhere, and for refusals whose subject we cannot know, the undefined x.0.0.
        status = _DEFAULT_SUCCESS.get(stage, "2.0.0") if code < 300 else f"{code // 100}.0.0"
        if match:  # the class disagrees with the code: keep the words, drop the bad status
            text = text[match.end() :]
    text = text[:400] or ("OK" if code < 400 else "Refused by the upstream mail server")
    return Reply(code, status, text, upstream_code=sent if sent != code else None)


class UpstreamSession(Protocol):
    capabilities: Capabilities

    @property
    def lost(self) -> bool: ...

    def discard(self) -> None: ...

    async def mail(self, sender: str, options: list[str], origin: Hop | None = None) -> Reply:
        """MAIL upstream; ``origin``: the client, told first with XFORWARD where that is on."""

    async def rcpt(self, recipient: str, options: list[str]) -> Reply: ...
    async def data(self, content: bytes | Outgoing) -> Reply: ...
    async def finish(self) -> None: ...
    async def abort(self) -> None: ...


class Upstream(Protocol):
    name: str

    @property
    def capabilities(self) -> Capabilities | None: ...

    async def open(self, txn_id: str) -> UpstreamSession: ...
    async def close(self) -> None: ...


# ---- Maildir ---------------------------------------------------------------------------------


class MaildirUpstream:
    """Each accepted message becomes one file in a Maildir: written to tmp/, fsync'd, renamed
    into new/, and the directory fsync'd, all before the 250 (so a crash never loses it)."""

    name = "maildir"

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._counter = itertools.count(1)  # next() is atomic; deliveries run in worker threads
        self._hostname = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    async def open(self, txn_id: str) -> MaildirSession:
        return MaildirSession(self, txn_id)

    async def close(self) -> None:
        return None

    def _unique_name(self) -> str:
        now = time.time()
        return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{next(self._counter)}.{self._hostname}"

    def deliver(self, content: bytes | Outgoing, sender: str, recipients: list[str]) -> str:
        """Blocking write; run in a thread. Returns the file name."""
        message = content if isinstance(content, Outgoing) else Outgoing(b"", content)
        envelope = [f"Return-Path: <{sender}>"] + [f"Delivered-To: {r}" for r in recipients]
        head = "\n".join(envelope).encode("utf-8", "surrogateescape") + b"\n"
        name = self._unique_name()
        tmp_path = self.path / "tmp" / name
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        size = 0
        try:
            try:
                # Block by block, so a big message is never copied whole. Maildir files use LF
                # line endings, like every local delivery agent writes them; a CR at the end
                # of a block waits to see whether the next block starts with its LF.
                pending_cr = False
                for block in itertools.chain((head,), message.blocks()):
                    data = bytes(block)
                    if pending_cr and not data.startswith(b"\n"):
                        data = b"\r" + data  # a bare CR: kept as it was
                    pending_cr = data.endswith(b"\r")
                    if pending_cr:
                        data = data[:-1]
                    size += _write_all(fd, data.replace(b"\r\n", b"\n"))
                if pending_cr:
                    size += _write_all(fd, b"\r")
                os.fsync(fd)
            finally:
                os.close(fd)
            final_name = f"{name},S={size}"
            os.rename(tmp_path, self.path / "new" / final_name)
        except BaseException:
            tmp_path.unlink(missing_ok=True)  # never leave a half-delivered file in tmp/
            raise
        dir_fd = os.open(self.path / "new", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final_name


class MaildirSession:
    capabilities = Capabilities()

    def __init__(self, upstream: MaildirUpstream, txn_id: str) -> None:
        self.upstream = upstream
        self.txn_id = txn_id
        self.sender = ""
        self.recipients: list[str] = []

    async def mail(self, sender: str, options: list[str], origin: Hop | None = None) -> Reply:
        self.sender, self.recipients = sender, []
        return Reply(250, "2.1.0", "Sender OK")

    async def rcpt(self, recipient: str, options: list[str]) -> Reply:
        self.recipients.append(recipient)
        return Reply(250, "2.1.5", "Recipient OK")

    async def data(self, content: bytes | Outgoing) -> Reply:
        try:
            name = await asyncio.to_thread(self.upstream.deliver, content, self.sender, self.recipients)
        except OSError:
            log.exception("txn %s: maildir write failed", self.txn_id)
            return Reply(451, "4.3.0", f"Local mail store write error; try again later ({self.txn_id})")
        return Reply(250, "2.0.0", f"Ok: delivered as {name}")

    lost = False

    def discard(self) -> None:
        return None  # nothing is written before data() completes

    async def finish(self) -> None:
        return None

    async def abort(self) -> None:
        return None


# ---- SMTP ------------------------------------------------------------------------------------


def _tls_failure(exc: BaseException) -> bool:
    """The connection failed in TLS: a certificate, a handshake, or STARTTLS not offered
    where it is required (as opposed to a host that does not answer)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "STARTTLS" in str(seen).upper() or "TLS" in type(seen).__name__.upper():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


async def _send_data(client: aiosmtplib.SMTP, message: Outgoing, step_limit: float) -> SMTPResponse:
    """aiosmtplib's ``SMTP.data`` with the message streamed: DATA, the 354, the message in
    blocks, each written once the transport has room for it (its flow control), then the
    reply to the final dot. aiosmtplib's own ``data`` normalises and dot-stuffs the whole
    message with two regular expressions and hands the transport all of it at once (which
    keeps a copy of what the socket did not take): three extra copies of a 25 MB message.

    It uses aiosmtplib's protocol as ``data`` does (its command lock, its reply reader, the
    flag that lets a reply in); the tests of the relay and of the smuggling cases cover it
    for every aiosmtplib release the project allows. Raises what ``data`` raises, and closes
    the connection like it when the upstream goes away or is too slow. ``step_limit``:
    seconds for each reply and for the room to write each block."""
    protocol = client.protocol
    lock = getattr(protocol, "_command_lock", None)
    if protocol is None or lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    try:
        async with lock:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=step_limit)
            if start.code != SMTPStatus.start_input:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            protocol._response_pending = True
            for block in stuffed_blocks(message):
                protocol.write(block)
                try:
                    # Waits only while the transport holds more than its high-water mark.
                    async with asyncio.timeout(step_limit):
                        await protocol._drain_helper()
                except TimeoutError:
                    raise aiosmtplib.SMTPTimeoutError("Timed out writing the message") from None
            response = await protocol.read_response(timeout=step_limit)
            if response.code != SMTPStatus.completed:
                raise aiosmtplib.SMTPDataError(response.code, response.message)
            return response
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, ConnectionError):
        client.close()
        raise


def _unasked_bytes(client: aiosmtplib.SMTP) -> int:
    """Bytes the upstream sent after the reply just read, in the same write: nobody asked for
    them, and aiosmtplib would hand them out as the reply to the next command (another
    client's, on a pooled connection). A connection holding any is out of step."""
    buffer = getattr(getattr(client, "protocol", None), "_buffer", None)
    return len(buffer) if buffer else 0


@dataclass(eq=False)
class _Connection:
    client: aiosmtplib.SMTP
    created: float
    last_used: float
    messages: int = 0
    reused: bool = False


class SmtpUpstream:
    """An upstream MTA reached with aiosmtplib, with a pool of reusable connections."""

    name = "smtp"

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        helo_name: str,
        on_reply: Callable[[str, str], None] | None = None,
        on_pool: Callable[[int, int], None] | None = None,
        on_timing: Callable[[str, float], None] | None = None,
    ) -> None:
        self.config = config
        self._on_pool = on_pool
        #: (stage, seconds): ``pool_wait`` for a slot, ``connect`` for TCP + TLS + EHLO + AUTH.
        self._on_timing = on_timing
        self.helo_name = config.helo_name or helo_name
        address = config.hostport
        self.host, self.port = address.host, address.port
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(config.pool.max_connections)
        self._known: Capabilities | None = None
        self._on_reply = on_reply
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        self.busy = 0

    @property
    def capabilities(self) -> Capabilities | None:
        """What the upstream offered on its last EHLO (None before the first connection)."""
        return self._known

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _report(self) -> None:
        if self._on_pool:
            self._on_pool(self.busy, len(self._idle))

    def count(self, stage: str, outcome: str) -> None:
        if self._on_reply:
            self._on_reply(stage, outcome)

    def _timing(self, stage: str, started: float) -> None:
        if self._on_timing:
            self._on_timing(stage, time.perf_counter() - started)

    async def open(self, txn_id: str) -> SmtpSession:
        if self._closed:
            raise UpstreamUnavailable(r451_upstream_unavailable(txn_id))
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.timeouts.connect):
                await self._slots.acquire()
        except TimeoutError:
            self._timing("pool_wait", started)
            log.warning("txn %s: all %d upstream connections busy", txn_id, self.config.pool.max_connections)
            raise UpstreamUnavailable(r451_upstream_busy(txn_id)) from None
        self._timing("pool_wait", started)
        self.busy += 1
        try:
            connection = self._take_idle() or await self._connect(txn_id)
        except BaseException:
            self.busy -= 1
            self._slots.release()
            raise
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())
        self._report()
        return SmtpSession(self, connection, txn_id)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            fresh = now - connection.last_used < self.config.pool.idle_timeout
            if connection.client.is_connected and fresh and not _unasked_bytes(connection.client):
                connection.reused = True
                return connection
            connection.client.close()
        return None

    async def _connect(self, txn_id: str) -> _Connection:
        config = self.config
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.helo_name,
            timeout=config.timeouts.command,
            use_tls=config.tls == "implicit",
            start_tls={"starttls": True, "opportunistic": None}.get(config.tls, False),
            validate_certs=config.verify_certificate,
            cert_bundle=config.ca_file,
            username=config.username,
            password=config.password,
        )
        started = time.perf_counter()
        try:
            await client.connect(timeout=config.timeouts.connect)
            if client.last_ehlo_response is None:  # connect() says EHLO only for STARTTLS or AUTH
                await client.ehlo(timeout=config.timeouts.connect)
        except aiosmtplib.SMTPAuthenticationError as exc:
            log.error("txn %s: upstream refused our AUTH: %s %s", txn_id, exc.code, exc.message)
            client.close()
            self.count("connect", "auth_failed")
            raise UpstreamUnavailable(r451_upstream_auth_refused(txn_id)) from exc
        except (aiosmtplib.SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            client.close()
            if _tls_failure(exc):
                log.error("txn %s: TLS with upstream %s:%s failed: %s", txn_id, self.host, self.port, exc)
                self.count("connect", "tls_failed")
                raise UpstreamUnavailable(r451_upstream_tls_failed(txn_id)) from exc
            timed_out = isinstance(exc, TimeoutError)
            log.error(
                "txn %s: upstream %s:%s unreachable (%s): %s",
                txn_id,
                self.host,
                self.port,
                "timeout" if timed_out else "connection failed",
                exc,
            )
            self.count("connect", "timeout" if timed_out else "error")
            raise UpstreamUnavailable(r451_upstream_unavailable(txn_id)) from exc
        self._timing("connect", started)
        self.count("connect", "2xx")
        extensions = client.esmtp_extensions
        size = extensions.get("size", "")
        self._known = Capabilities(
            smtputf8="smtputf8" in extensions,
            eightbitmime="8bitmime" in extensions,
            size=int(size) if size.isdigit() and int(size) > 0 else None,
            dsn="dsn" in extensions,
            xforward=frozenset(extensions.get("xforward", "").upper().split()),
        )
        now = time.monotonic()
        return _Connection(client, created=now, last_used=now)

    async def replace(self, txn_id: str) -> _Connection:
        """A fresh connection for a session whose pooled one went stale, in the same pool slot;
        on failure (or cancellation) the slot is given back and the exception raised."""
        try:
            return await self._connect(txn_id)
        except BaseException:
            self.busy -= 1
            self._slots.release()
            self._report()
            raise

    def give_back(self, connection: _Connection, *, healthy: bool) -> None:
        self.busy -= 1
        self._slots.release()
        connection.last_used = time.monotonic()
        if (
            healthy
            and not self._closed
            and connection.client.is_connected
            and connection.messages < self.config.pool.max_messages_per_connection
            and not _unasked_bytes(connection.client)
        ):
            self._idle.append(connection)
        else:
            asyncio.get_running_loop().create_task(self._quit(connection))
        self._report()

    @staticmethod
    async def _quit(connection: _Connection) -> None:
        try:
            if connection.client.is_connected:
                await asyncio.wait_for(connection.client.quit(), 5)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            connection.client.close()

    async def _reap_idle(self) -> None:
        interval = max(1.0, min(10.0, self.config.pool.idle_timeout / 2))
        while not self._closed:
            await asyncio.sleep(interval)
            now = time.monotonic()
            # Take every stale connection out at once, then say QUIT: a session may take one
            # from the idle list while we wait for a QUIT reply.
            stale = [c for c in self._idle if now - c.last_used >= self.config.pool.idle_timeout]
            self._idle = [c for c in self._idle if c not in stale]
            self._report()
            await asyncio.gather(*(self._quit(c) for c in stale), return_exceptions=True)

    async def close(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(c) for c in idle), return_exceptions=True)


class SmtpSession:
    """One client transaction relayed in lockstep over a pooled upstream connection."""

    def __init__(self, upstream: SmtpUpstream, connection: _Connection, txn_id: str) -> None:
        self.upstream = upstream
        self.connection = connection
        self.txn_id = txn_id
        self.capabilities = upstream.capabilities or Capabilities()
        self._released = False
        self._in_transaction = False
        self._pending = False

    @property
    def client(self) -> aiosmtplib.SMTP:
        return self.connection.client

    async def _command(self, stage: str, verb: bytes, argument: bytes, limit: float) -> Reply:
        self._pending = True  # until the reply is read: cancelled here, the connection is in doubt
        try:
            response = await self.client.execute_command(verb, argument, timeout=limit)
        except aiosmtplib.SMTPTimeoutError:
            log.error("txn %s: upstream timed out after %s", self.txn_id, stage)
            self.upstream.count(stage, "timeout")
            raise
        except (aiosmtplib.SMTPServerDisconnected, OSError):
            log.error("txn %s: upstream connection lost at %s", self.txn_id, stage)
            self.upstream.count(stage, "disconnected")
            raise
        self._pending = False
        if _unasked_bytes(self.client):
            # More than one reply to one command: which of them answers it is unknowable, and
            # the next command would read the extra one. End the transaction (the client sends
            # again) and drop the connection.
            log.error("txn %s: upstream sent more than its reply to %s; dropping the connection", self.txn_id, stage)
            self.upstream.count(stage, "error")
            raise aiosmtplib.SMTPServerDisconnected("upstream out of step")
        self.upstream.count(stage, f"{response.code // 100}xx")
        return reply_from_upstream(response.code, response.message, stage=stage, txn_id=self.txn_id)

    async def _xforward(self, origin: Hop) -> None:
        """Tell the upstream who the client is (Postfix's smtp_send_xforward_command), in
        commands of at most 512 octets. XFORWARD only improves the upstream's logging: a
        refusal is logged and the transaction goes on without it."""
        offered = self.capabilities.xforward
        words = [f"{name}={value}" for name, value in xforward_attributes(origin, self.txn_id) if name in offered]
        commands: list[str] = []
        for word in words:
            if commands and len(commands[-1]) + 1 + len(word) <= 500:
                commands[-1] += " " + word
            else:
                commands.append(word)
        for command in commands:
            reply = await self._command(
                "xforward", b"XFORWARD", command.encode("ascii"), self.upstream.config.timeouts.command
            )
            if not reply.is_success:
                log.warning("txn %s: upstream refused XFORWARD: %s", self.txn_id, reply.line())
                return

    async def mail(self, sender: str, options: list[str], origin: Hop | None = None) -> Reply:
        argument = b"FROM:<" + sender.encode("utf-8") + b">" + b"".join(b" " + o.encode("ascii") for o in options)
        try:
            if origin is not None and self.upstream.config.send_xforward and self.capabilities.xforward:
                await self._xforward(origin)
            reply = await self._command("mail", b"MAIL", argument, self.upstream.config.timeouts.command)
        except (aiosmtplib.SMTPServerDisconnected, OSError):
            if not self.connection.reused:
                self._release(healthy=False)
                return r451_upstream_lost(self.txn_id)
            # A pooled connection the upstream closed while idle: try once on a fresh one.
            log.info("txn %s: pooled upstream connection was stale; reconnecting", self.txn_id)
            self.connection.client.close()
            try:
                self.connection = await self.upstream.replace(self.txn_id)
            except UpstreamUnavailable as exc:
                self._released = True  # replace() gave the pool slot back
                return exc.reply
            except BaseException:
                self._released = True  # cancelled while reconnecting: replace() gave the slot back
                raise
            return await self.mail(sender, options, origin)
        except aiosmtplib.SMTPTimeoutError:
            self._release(healthy=False)
            return r451_upstream_lost(self.txn_id)
        self._in_transaction = reply.is_success
        return reply

    async def rcpt(self, recipient: str, options: list[str]) -> Reply:
        argument = b"TO:<" + recipient.encode("utf-8") + b">" + b"".join(b" " + o.encode("ascii") for o in options)
        try:
            return await self._command("rcpt", b"RCPT", argument, self.upstream.config.timeouts.command)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError):
            self._release(healthy=False)
            return r451_upstream_lost(self.txn_id)

    async def data(self, content: bytes | Outgoing) -> Reply:
        """DATA and the message, written block by block (``rawmsg.stuffed_blocks``: bare CR/LF
        made CRLF, every line that starts with '.' dot-stuffed), so the upstream sees exactly
        one message (T10) and a big one is never copied whole."""
        self._pending = True
        message = content if isinstance(content, Outgoing) else Outgoing(b"", content)
        try:
            response = await _send_data(self.client, message, self.upstream.config.timeouts.data)
        except aiosmtplib.SMTPDataError as exc:
            self._pending = False
            if exc.code < 400:
                # A 2xx or 3xx where the other belongs (a 250 to the DATA command itself, say):
                # the upstream and we disagree about where we are. Never pass it on as success.
                log.error("txn %s: upstream answered %s %s out of turn at DATA", self.txn_id, exc.code, exc.message)
                self.upstream.count("data", "error")
                self.discard()
                return r451_upstream_lost(self.txn_id)
            self.upstream.count("data", f"{exc.code // 100}xx")
            # Refused at the DATA command (before 354) the transaction is still open upstream;
            # after the dot it is over. RSET is right in both cases, so finish() will say it.
            self._in_transaction = True
            return reply_from_upstream(exc.code, exc.message, stage="data", txn_id=self.txn_id)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            # The message may or may not have arrived; 451 makes the client retry, which risks
            # a duplicate but never a loss (T3).
            log.error("txn %s: upstream connection lost during DATA: %s", self.txn_id, exc)
            self.upstream.count("data", "timeout" if isinstance(exc, TimeoutError) else "disconnected")
            self._release(healthy=False)
            return r451_upstream_lost(self.txn_id)
        self._pending = False
        self._in_transaction = False
        self.connection.messages += 1
        if _unasked_bytes(self.client):
            # The reply to the final dot came first and is the upstream's answer to this
            # message (a 451 now would make the client send a duplicate); what followed it
            # was unasked, so the connection is dropped, never pooled for someone else.
            log.error(
                "txn %s: upstream sent more than its reply to the final dot; dropping the connection", self.txn_id
            )
            self.upstream.count("data", "error")
            reply = reply_from_upstream(response.code, response.message, stage="data", txn_id=self.txn_id)
            self.discard()
            return reply
        self.upstream.count("data", f"{response.code // 100}xx")
        return reply_from_upstream(response.code, response.message, stage="data", txn_id=self.txn_id)

    @property
    def lost(self) -> bool:
        """The connection is gone (or given back): nothing more can be relayed on this session."""
        return self._released

    def discard(self) -> None:
        """Drop the connection at once, mid-command if need be: the upstream must never
        complete a transaction the client abandoned (a close without the final dot)."""
        if not self._released:
            self.client.close()
            self._release(healthy=False)

    def _release(self, *, healthy: bool) -> None:
        if not self._released:
            self._released = True
            self.upstream.give_back(self.connection, healthy=healthy)

    async def finish(self) -> None:
        if self._in_transaction:
            await self.abort()
        else:
            self._release(healthy=True)

    async def abort(self) -> None:
        """Abandon the transaction: RSET so the upstream never completes it (T7). A command
        cut off before its reply (the client went away) leaves the connection in doubt: a
        RSET could read that old reply, so the connection is closed instead."""
        if self._released:
            return
        if self._pending:
            self.discard()
            return
        healthy = False
        if self.client.is_connected:
            try:
                response = await self.client.execute_command(b"RSET", timeout=self.upstream.config.timeouts.command)
                healthy = response.code == 250
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                healthy = False
        self._in_transaction = False
        self._release(healthy=healthy)


def build_upstream(
    config: UpstreamConfig,
    *,
    helo_name: str,
    on_reply: Callable[[str, str], None] | None = None,
    on_pool: Callable[[int, int], None] | None = None,
    on_timing: Callable[[str, float], None] | None = None,
) -> MaildirUpstream | SmtpUpstream:
    if config.is_maildir:
        return MaildirUpstream(config.maildir_path)
    return SmtpUpstream(config, helo_name=helo_name, on_reply=on_reply, on_pool=on_pool, on_timing=on_timing)
