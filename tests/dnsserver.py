"""A real DNS server on 127.0.0.1 for tests: UDP and TCP, serving a zone held in a dict.

Tests never touch the Internet's DNS. Names that are not in the zone get NXDOMAIN (which
is what a DNS blocklist answers for "not listed"); names that exist without the asked
type get NOERROR with an empty answer.

    server = await DNSServer({("example.com", "MX"): ["10 mx1.example.com."],
                              ("example.com", "TXT"): ['"v=spf1 ip4:192.0.2.1 -all"']}).start()
    resolver = server.resolver()      # a dns.asyncresolver.Resolver pointed at it
"""

from __future__ import annotations

import asyncio
import struct
import typing

import dns.asyncresolver
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = dict[tuple[str, str], list[str]]


def _key(name: str, rdtype: str) -> tuple[str, str]:
    return name.lower().rstrip(".") + ".", rdtype.upper()


class DNSServer:
    def __init__(self, zone: Zone | None = None, ttl: int = 60) -> None:
        self.zone: Zone = {}
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        for (name, rdtype), values in (zone or {}).items():
            self.set(name, rdtype, values)
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None

    def set(self, name: str, rdtype: str, values: list[str]) -> None:
        self.zone[_key(name, rdtype)] = list(values)

    def remove(self, name: str, rdtype: str) -> None:
        self.zone.pop(_key(name, rdtype), None)

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name.rstrip("."), rdtype))
        values = self.zone.get((name, rdtype))
        if values is None:
            exists = any(key_name == name for key_name, _ in self.zone)
            response.set_rcode(dns.rcode.NOERROR if exists else dns.rcode.NXDOMAIN)
            return response.to_wire()
        rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, question.rdtype)
        rrset.update_ttl(self.ttl)
        for value in values:
            rrset.add(dns.rdata.from_text(dns.rdataclass.IN, question.rdtype, value))
        response.answer.append(rrset)
        return response.to_wire()

    async def start(self) -> DNSServer:
        loop = asyncio.get_running_loop()
        server = self

        class UDP(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = typing.cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                self.transport.sendto(server.answer(data), addr)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    reply = server.answer(await reader.readexactly(length))
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        # One port for both, like a real server: bind TCP first, then UDP on the same number.
        for _ in range(20):
            self._tcp = await asyncio.start_server(tcp, "127.0.0.1", 0)
            self.port = self._tcp.sockets[0].getsockname()[1]
            try:
                transport, _ = await loop.create_datagram_endpoint(UDP, local_addr=("127.0.0.1", self.port))
            except OSError:
                self._tcp.close()
                continue
            self._udp = transport
            return self
        raise RuntimeError("no free port for the test DNS server")

    def resolver(self, timeout: float = 2.0) -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.timeout = timeout
        resolver.lifetime = timeout
        resolver.cache = None
        return resolver

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
