"""Test doubles that are real servers: a recording, fault-injecting upstream MTA built on
aiosmtpd, and a lenient raw upstream that ends DATA on any smuggling sequence.

Both listen on 127.0.0.1 with an ephemeral port, in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    #: As the client wrote them (aiosmtpd upper-cases ``mail_options``), and each recipient's.
    raw_mail_options: list[str] = field(default_factory=list)
    rcpt_options: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Faults:
    """What the fake upstream does wrong. Every field is optional; the default is a good MTA."""

    mail_reply: str | None = None  # e.g. "451 4.3.0 try later"
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply
    data_reply: str | None = None  # reply to the final dot
    data_replies: dict[str, str] = field(default_factory=dict)  # recipient -> reply to the final dot
    drop_at: str | None = None  # "mail", "rcpt", "data-start", "data-end": close without reply
    hang_at: str | None = None  # same stages: never answer
    hang_seconds: float = 30.0
    #: A line sent right after a reply, in the same write, unasked: stage -> line.
    #: ("data-end": after the reply to the final dot; "mail", "rcpt": after those replies.)
    extra_line: dict[str, str] = field(default_factory=dict)
    #: Seconds to wait before answering the final dot (lets concurrent transactions overlap).
    data_delay: float = 0.0
    #: Recipients whose transaction loses its connection at the final dot, without a reply.
    drop_data_for: set[str] = field(default_factory=set)


class RecordingHandler:
    def __init__(self, faults: Faults, credentials: tuple[str, str] | None) -> None:
        self.faults = faults
        self.messages: list[Received] = []
        self.commands: list[str] = []
        self.credentials = credentials
        self.rsets = 0
        #: Offer DSN (RFC 3461) and take its parameters.
        self.dsn = False
        #: Each transaction's parameters as written, per connection (copies run concurrently).
        self._raw_mail: dict[int, list[str]] = {}
        self._raw_rcpt: dict[int, dict[str, list[str]]] = {}
        #: Transactions between their final dot and its reply, now and at most.
        self.in_data = 0
        self.most_in_data = 0

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-DSN", responses[-1]] if self.dsn else responses

    async def _fault(self, server: SMTP, stage: str) -> None:
        if self.faults.drop_at == stage:
            assert server.transport is not None
            server.transport.abort()
            raise asyncio.CancelledError
        if self.faults.hang_at == stage:
            await asyncio.sleep(self.faults.hang_seconds)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.commands.append(f"MAIL {address} {' '.join(options)}".strip())
        await self._fault(server, "mail")
        if self.faults.mail_reply:
            if self.faults.mail_reply.startswith("2"):  # a success in other words: still a sender
                envelope.mail_from = address
            return self.faults.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self._raw_mail[id(server)], self._raw_rcpt[id(server)] = list(getattr(server, "raw_params", [])), {}
        return self._with_extra("mail", "250 2.1.0 Ok")

    def _with_extra(self, stage: str, reply: str) -> str:
        extra = self.faults.extra_line.get(stage)
        return f"{reply}\r\n{extra}" if extra else reply

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.commands.append(f"RCPT {address}")
        await self._fault(server, "rcpt")
        reply = self.faults.rcpt_replies.get(address)
        if reply:
            if reply.startswith("2"):
                envelope.rcpt_tos.append(address)
            return reply
        envelope.rcpt_tos.append(address)
        self._raw_rcpt.setdefault(id(server), {})[address] = list(getattr(server, "raw_params", []))
        return self._with_extra("rcpt", "250 2.1.5 Ok")

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("RSET")
        self.rsets += 1
        return "250 2.0.0 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.commands.append("DATA")
        self.in_data += 1
        self.most_in_data = max(self.most_in_data, self.in_data)
        try:
            if self.faults.data_delay:
                await asyncio.sleep(self.faults.data_delay)
            if self.faults.drop_data_for & set(envelope.rcpt_tos):
                assert server.transport is not None
                server.transport.abort()
                raise asyncio.CancelledError
            return await self._data_reply(server, envelope)
        finally:
            self.in_data -= 1

    async def _data_reply(self, server: SMTP, envelope: Envelope) -> str:
        await self._fault(server, "data-end")
        if self.faults.data_reply:
            return self.faults.data_reply
        for recipient in envelope.rcpt_tos:
            if recipient in self.faults.data_replies:
                return self.faults.data_replies[recipient]
        assert envelope.original_content is not None
        self.messages.append(
            Received(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
                self._raw_mail.get(id(server), []),
                self._raw_rcpt.get(id(server), {}),
            )
        )
        return self._with_extra("data-end", f"250 2.0.0 Ok: queued as Q{len(self.messages)}")

    def authenticator(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        if self.credentials and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials:
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


class FaultySMTP(SMTP):
    """aiosmtpd server whose DATA can break off in the middle of the message."""

    line_length_limit = 65536  # like Postfix, which accepts long lines

    def __init__(self, handler: RecordingHandler, *args: Any, **kwargs: Any) -> None:
        super().__init__(handler, *args, **kwargs)
        self.recorder = handler
        self.raw_params: list[str] = []

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        address, rest = super()._getaddr(arg)
        self.raw_params = rest.split() if rest else []
        return address, rest

    def _getparams(self, params: Any) -> dict[str, str | bool] | None:
        result = super()._getparams(params)
        if result is not None and self.recorder.dsn:  # the DSN parameters are known
            for keyword in ("RET", "ENVID", "NOTIFY", "ORCPT"):
                result.pop(keyword, None)
        return result

    async def smtp_DATA(self, arg: str) -> None:
        if self.recorder.faults.drop_at == "data-start" and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self._reader.readline()  # one line of the message, then vanish
            assert self.transport is not None
            self.transport.abort()
            return
        await super().smtp_DATA(arg)


class FakeUpstream:
    """A real SMTP server on 127.0.0.1:0 that records what it receives."""

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        credentials: tuple[str, str] | None = None,
        smtputf8: bool = True,
        eightbitmime: bool = True,
        size_limit: int | None = 33554432,
        dsn: bool = False,
    ) -> None:
        self.faults = faults or Faults()
        self.handler = RecordingHandler(self.faults, credentials)
        self.handler.dsn = dsn
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.require_starttls = require_starttls
        self.smtputf8 = smtputf8
        self.eightbitmime = eightbitmime
        self.size_limit = size_limit
        self.connections = 0
        self.sessions: list[SMTP] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def drop_all(self) -> None:
        """Close every open connection, as an upstream's idle timeout would."""
        for session in self.sessions:
            if session.transport is not None:
                session.transport.close()

    def _factory(self) -> SMTP:
        self.connections += 1
        kwargs: dict[str, Any] = {
            "hostname": "upstream.test",
            "enable_SMTPUTF8": self.smtputf8,
            "decode_data": not self.eightbitmime,  # aiosmtpd offers 8BITMIME only without decoding
            "data_size_limit": self.size_limit,
            "tls_context": None if self.implicit_tls else self.tls_context,
            "require_starttls": self.require_starttls,
            "timeout": 60,
        }
        if self.handler.credentials:
            kwargs["authenticator"] = self.handler.authenticator
            kwargs["auth_required"] = True
            # aiosmtpd does not see implicit TLS as TLS (it only tracks STARTTLS)
            kwargs["auth_require_tls"] = not self.implicit_tls
        session = FaultySMTP(self.handler, **kwargs)
        self.sessions.append(session)
        return session

    async def start(self) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._factory, "127.0.0.1", 0, ssl=self.tls_context if self.implicit_tls else None
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2)


# Every end-of-data variant of the smuggling scanners (reliability anchors 1.2), treated as
# the end of DATA by this deliberately broken upstream.
LENIENT_EOD = (
    b"\r\n.\r\n",
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
)


class LenientUpstream:
    """A raw SMTP server that ends DATA at the first of any smuggling sequence, like the
    lenient MTAs of CVE-2023-51764. Counts the transactions it accepts and keeps the wire."""

    def __init__(self) -> None:
        self.wire = bytearray()
        self.accepted: list[tuple[bytes, bytes]] = []  # (MAIL line, message bytes)
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 lenient.test ESMTP\r\n")
        buffer = b""
        mail_line = b""
        in_data = False
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                self.wire.extend(chunk)
                buffer += chunk
                while True:
                    if in_data:
                        ends = [(buffer.find(seq), seq) for seq in LENIENT_EOD if buffer.find(seq) != -1]
                        if not ends:
                            break
                        index, seq = min(ends)
                        self.accepted.append((mail_line, buffer[:index]))
                        buffer = buffer[index + len(seq) :]
                        in_data = False
                        writer.write(b"250 2.0.0 queued\r\n")
                        continue
                    line_end = buffer.find(b"\n")
                    if line_end == -1:
                        break
                    line, buffer = buffer[:line_end].rstrip(b"\r"), buffer[line_end + 1 :]
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        writer.write(b"250-lenient.test\r\n250 8BITMIME\r\n")
                    elif verb == b"MAIL":
                        mail_line = line
                        writer.write(b"250 2.1.0 ok\r\n")
                    elif verb == b"RCPT":
                        writer.write(b"250 2.1.5 ok\r\n")
                    elif verb == b"DATA":
                        in_data = True
                        writer.write(b"354 go\r\n")
                    elif verb == b"QUIT":
                        writer.write(b"221 bye\r\n")
                        await writer.drain()
                        return
                    else:
                        writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()

    async def start(self) -> LenientUpstream:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


class ScriptedUpstream:
    """A raw SMTP server that answers each verb with a scripted reply (bytes, sent as they are),
    for upstreams that misbehave in ways aiosmtpd will not: a 250 to the DATA command itself,
    a reply in Latin-1. Records every command line and counts the messages it took."""

    def __init__(self, replies: dict[str, bytes] | None = None) -> None:
        self.replies = {
            "EHLO": b"250-scripted.test\r\n250 8BITMIME",
            "MAIL": b"250 2.1.0 ok",
            "RCPT": b"250 2.1.5 ok",
            "DATA": b"354 go",
            "DOT": b"250 2.0.0 queued",
            "RSET": b"250 2.0.0 ok",
            "QUIT": b"221 bye",
            **(replies or {}),
        }
        self.commands: list[bytes] = []
        self.messages = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                self.commands.append(line.rstrip(b"\r\n"))
                verb = line[:4].upper().decode("ascii", "replace")
                reply = self.replies.get(verb, b"250 ok")
                writer.write(reply + b"\r\n")
                await writer.drain()
                if verb == "DATA" and reply.startswith(b"354"):
                    while (data := await reader.readline()) and data != b".\r\n":
                        pass
                    self.messages += 1
                    writer.write(self.replies["DOT"] + b"\r\n")
                if verb == "QUIT":
                    return
        finally:
            writer.close()

    async def start(self) -> ScriptedUpstream:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
