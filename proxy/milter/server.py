"""The milter protocol, through pymilter (Sendmail's libmilter): ``sendguard milter``.

libmilter reads the MTA's connections in threads of its own and calls pymilter's callbacks
there; each callback hands its work to the event loop the runtime lives on
(``run_coroutine_threadsafe``) and waits for the answer, so the policies, stores and
metrics run where they always run. libmilter holds one listening socket per process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import Milter

from policies.base import Reply
from proxy import replies as R
from proxy.milter.session import EndOfMessage, MilterHost, MilterSession, Peer

__all__ = ("MilterServer", "libmilter_address", "no_delay")

log = logging.getLogger("sendguard.milter")

_T = TypeVar("_T")

#: Each callback's whole budget on the loop: libmilter's own MTA timeout is longer (Postfix's
#: milter_content_timeout 300s); a policy has its own, shorter timeouts.
_CALL_TIMEOUT = 240.0


def libmilter_address(listen: str) -> str:
    """``inet:HOST:PORT`` or ``unix:PATH`` (as Postfix's smtpd_milters writes it) in
    libmilter's spelling (``inet:PORT@HOST``, ``unix:PATH``)."""
    kind, _, rest = listen.partition(":")
    if kind == "unix" and rest:
        return listen
    if kind in ("inet", "inet6") and rest:
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return f"{kind}:{port}@{host.strip('[]')}"
    raise ValueError(f"--listen {listen!r}: expected inet:HOST:PORT or unix:PATH")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value) if value is not None else ""


def _address(value: Any) -> str:
    """An envelope address as the MTA passes it ("<a@b>"), without its brackets."""
    text = _text(value).strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text


def no_delay(address: str) -> None:
    """TCP_NODELAY on libmilter's listening socket (Linux hands it on to every accepted
    connection). libmilter writes each end-of-message action as its own packet and the MTA
    answers none of them: with Nagle's algorithm the final accept then waits for the
    MTA's delayed ACK, 40 ms per message with header edits (measured with miltertest:
    22 messages/s in sequence without, bench/milter_libraries.py)."""
    kind, _, rest = address.partition(":")
    if kind not in ("inet", "inet6"):
        return
    port = int(rest.partition("@")[0])
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # not a socket
        with sock:
            try:
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                local = sock.getsockname()
            except OSError:
                continue
            if (
                listening
                and sock.family in (socket.AF_INET, socket.AF_INET6)
                and isinstance(local, tuple)
                and local[1] == port
            ):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MilterServer:
    """The process's one milter listener, answering from the host's running runtime."""

    def __init__(self, host: MilterHost, loop: asyncio.AbstractEventLoop, listen: str, *, max_message_size: int):
        self.host = host
        self.loop = loop
        self.address = libmilter_address(listen)
        self.max_message_size = max_message_size
        self.stopped = threading.Event()

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(_CALL_TIMEOUT)

    def run(self) -> None:
        """Serve until ``stop`` (blocking: run it in a thread of its own)."""
        server = self

        class Connection(_Connection):
            pass

        Connection.server = server
        Milter.factory = Connection
        milter = Milter.milter
        # Header edits and, for a footer, the body; nothing else (no recipient changes).
        milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY)
        # A callback that raises (a bug) answers 451, never leaves the MTA waiting.
        Milter.set_exception_policy(Milter.TEMPFAIL)
        # Milter.runmilter's steps, with one added between opening the socket and serving:
        # TCP_NODELAY (see no_delay).
        milter.set_connect_callback(Milter.connect_callback)
        milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
        milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
        milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
        milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
        milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
        milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
        milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
        milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
        milter.set_close_callback(Milter.close_callback)
        milter.setconn(self.address)
        milter.settimeout(300)
        milter.register(
            "sendguard",
            data=lambda ctx: ctx.getpriv().data(),
            unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
            negotiate=Milter.negotiate_callback,
        )
        try:
            milter.opensocket(True)
            no_delay(self.address)
            milter.main()
        finally:
            self.stopped.set()

    def stop(self) -> None:
        Milter.stop()


@Milter.header_leading_space
class _Connection(Milter.Base):  # type: ignore[misc]
    """One MTA connection (libmilter's thread); every answer comes from the loop."""

    server: MilterServer

    def __init__(self) -> None:
        self.session: MilterSession | None = None
        self.fields: list[tuple[str, str]] = []
        self.content = bytearray()
        self.too_big = False

    # ---- answers ------------------------------------------------------------------------

    def _answer(self, reply: Reply | None) -> int:
        if reply is None or reply.is_success:
            return int(Milter.CONTINUE)
        # libmilter reads % in a reply as a format character
        self.setreply(str(reply.code), reply.status, reply.text.replace("%", "%%"))
        return int(Milter.TEMPFAIL if reply.is_temporary else Milter.REJECT)

    def _guarded(self, step: str, coro: Coroutine[Any, Any, Reply | None]) -> int:
        try:
            return self._answer(self.server.call(coro))
        except Exception:
            log.exception("milter %s failed", step)
            return self._answer(R.R451_MILTER_INTERNAL)

    # ---- events -------------------------------------------------------------------------

    def connect(self, hostname: Any, family: Any, hostaddr: Any) -> int:
        address = hostaddr[0] if isinstance(hostaddr, tuple) and hostaddr else _text(self.getsymval("{client_addr}"))
        name = _text(hostname)
        if name.startswith("[") or name == "unknown":
            name = ""
        peer = Peer(client_ip=address or "unknown", client_name=name or None, by=_text(self.getsymval("j")) or None)
        self.session = MilterSession(self.server.host, peer, max_message_size=self.server.max_message_size)
        return int(Milter.CONTINUE)

    def hello(self, hostname: Any) -> int:
        if self.session is not None:
            peer = self.session.peer
            peer.helo = _text(hostname) or None
            peer.tls_version = _text(self.getsymval("{tls_version}")) or None
            peer.tls_cipher = _text(self.getsymval("{cipher}")) or None
            bits = _text(self.getsymval("{cipher_bits}"))
            peer.tls_bits = int(bits) if bits.isdigit() else None
        return int(Milter.CONTINUE)

    def envfrom(self, sender: Any, *params: Any) -> int:
        session = self.session
        if session is None:
            return int(Milter.TEMPFAIL)
        self.fields, self.content, self.too_big = [], bytearray(), False
        session.peer.auth_user = _text(self.getsymval("{auth_authen}")) or None
        return self._guarded("MAIL", session.mail(_address(sender), [_text(p) for p in params]))

    def envrcpt(self, recipient: Any, *params: Any) -> int:
        if self.session is None:
            return int(Milter.TEMPFAIL)
        return self._guarded("RCPT", self.session.rcpt(_address(recipient), [_text(p) for p in params]))

    def header(self, name: Any, value: Any) -> int:
        # With SMFIP_HDR_LEADSPC the value is as it follows the colon; folds come with LF.
        text = _text(value).replace("\r\n", "\n").replace("\n", "\r\n")
        self.fields.append((_text(name), text))
        return int(Milter.CONTINUE)

    def eoh(self) -> int:
        return int(Milter.CONTINUE)  # asked for (not SMFIP_NOEOH): some MTAs and drivers send it regardless

    def body(self, chunk: bytes) -> int:
        if self.session is not None and len(self.content) + len(chunk) > self.session.max_message_size:
            self.too_big = True
        elif not self.too_big:
            self.content.extend(chunk)
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        session = self.session
        if session is None:
            return int(Milter.TEMPFAIL)
        body = b"" if self.too_big else bytes(self.content)
        fields, self.fields, self.content = self.fields, [], bytearray()
        if self.too_big:
            return self._guarded("end of message", _too_big(session))
        try:
            end: EndOfMessage = self.server.call(session.end_of_message(fields, body))
        except Exception:
            log.exception("milter end of message failed")
            return self._answer(R.R451_MILTER_INTERNAL)
        if end.reply is not None:
            return self._answer(end.reply)
        try:
            for action in end.actions:
                value = None if action.value is None else action.value.replace("\r\n", "\n")
                if action.kind == "insert":
                    self.addheader(action.name, value or "", 0)
                else:
                    self.chgheader(action.name, action.index, value or "")
            if end.body is not None:
                for start in range(0, len(end.body), 65536):
                    self.replacebody(end.body[start : start + 65536])
        except Exception:
            # The transaction is on record as delivered; the MTA must not send it half-edited.
            log.exception("milter actions failed")
            return self._answer(R.R451_MILTER_INTERNAL)
        return int(Milter.ACCEPT)

    def abort(self) -> int:
        self.fields, self.content = [], bytearray()
        if self.session is not None:
            self.server.call(self.session.abandon("aborted by the MTA"))
        return int(Milter.CONTINUE)

    def close(self) -> int:
        if self.session is not None:
            session, self.session = self.session, None
            try:
                self.server.call(session.abandon("connection closed"))
            except Exception:
                log.exception("milter close failed")
        return int(Milter.CONTINUE)


async def _too_big(session: MilterSession) -> Reply:
    reply = R.r552_message_too_big(session.max_message_size)
    relay, session.relay = session.relay, None
    if relay is not None:
        await relay.end("rejected", client_reply=reply)
    return reply
