"""An HTTP/3 server on aioquic, an independent QUIC stack (not quiche), for the direct-mode
interop tests (perf/tests/interop.rs).

It serves what the project's own test server serves (agent/src/direct/h3.rs, `H3Server`):
`GET /N` answers N bytes of the body pattern `body_byte`, anything else 404. aioquic is used as
its own example server uses it, with its defaults: it issues connection IDs, allows active
migration, follows a client that moves (RFC 9000 §9.3) and retires the client's connection IDs
when it changes paths, as a conforming server may.

    aioquic_h3_server.py --listen ADDR --port PORT --stats FILE [--qlog-dir DIR]

Prints `ready` on stdout once it listens. On SIGTERM or SIGINT it writes its counters as one
JSON object to FILE and exits: requests, responses (200s sent in full), not_found, body_bytes,
client_addresses (distinct client address:port pairs seen), connections, and closes (how each
connection ended: error code, frame type and reason, as aioquic reports them).
"""

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import signal
import sys
import tempfile

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, ProtocolNegotiated
from aioquic.quic.logger import QuicFileLogger
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# The largest body served: the tests ask for tens of kilobytes.
MAX_BODY = 1 << 20

STATS = {
    "requests": 0,
    "responses": 0,
    "not_found": 0,
    "body_bytes": 0,
    "client_addresses": 0,
    "connections": 0,
    "closes": [],
}
PEERS = set()


def body_byte(offset):
    """agent/src/direct/h3.rs `body_byte`: a position-dependent pattern."""
    return ((offset * 7) ^ (offset >> 8)) % 251


class Body:
    """The pattern's first bytes, computed once as far as asked for."""

    def __init__(self):
        self.buf = bytearray()

    def prefix(self, n):
        if n > len(self.buf):
            self.buf.extend(body_byte(i) for i in range(len(self.buf), n))
        return bytes(self.buf[:n])


BODY = Body()


def route(headers):
    """(status, body) for a request's headers."""
    fields = dict(headers)
    path = fields.get(b":path", b"")
    if fields.get(b":method") == b"GET" and path.startswith(b"/") and path[1:].isdigit():
        n = int(path[1:])
        if n <= MAX_BODY:
            return 200, BODY.prefix(n)
    return 404, b"not found\n"


class Handler(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = None
        STATS["connections"] += 1

    def quic_event_received(self, event):
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self.h3 = H3Connection(self._quic)
        if isinstance(event, ConnectionTerminated):
            STATS["closes"].append(
                {
                    "error_code": event.error_code,
                    "frame_type": event.frame_type,
                    "reason": event.reason_phrase,
                }
            )
        if self.h3 is None:
            return
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                STATS["requests"] += 1
                status, body = route(ev.headers)
                self.h3.send_headers(
                    ev.stream_id,
                    [
                        (b":status", str(status).encode()),
                        (b"content-length", str(len(body)).encode()),
                    ],
                )
                self.h3.send_data(ev.stream_id, body, end_stream=True)
                if status == 200:
                    STATS["responses"] += 1
                    STATS["body_bytes"] += len(body)
                else:
                    STATS["not_found"] += 1
        self.transmit()


class CountingServer(QuicServer):
    """aioquic's server, counting the client addresses it hears from."""

    def datagram_received(self, data, addr):
        key = addr[:2]
        if key not in PEERS:
            PEERS.add(key)
            STATS["client_addresses"] += 1
        super().datagram_received(data, addr)


def self_signed(directory):
    """A throwaway certificate and key (the client does not verify them)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quic.tech")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("quic.tech")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


async def main(args):
    config = QuicConfiguration(alpn_protocols=H3_ALPN, is_client=False)
    if args.qlog_dir:
        config.quic_logger = QuicFileLogger(args.qlog_dir)
    with tempfile.TemporaryDirectory() as d:
        config.load_cert_chain(*self_signed(d))
    ipaddress.ip_address(args.listen)  # a clear error for a bad address
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_datagram_endpoint(
        lambda: CountingServer(configuration=config, create_protocol=Handler),
        local_addr=(args.listen, args.port),
    )
    print("ready", flush=True)
    try:
        await stop
    finally:
        server[1].close()
        with open(args.stats, "w") as f:
            json.dump(STATS, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="address to listen on")
    parser.add_argument("--port", type=int, default=4433)
    parser.add_argument("--stats", required=True, help="where to write the counters at exit")
    parser.add_argument("--qlog-dir", help="write a qlog per connection here")
    try:
        asyncio.run(main(parser.parse_args()))
    except (OSError, ValueError) as e:
        print(f"aioquic_h3_server: {e}", file=sys.stderr)
        sys.exit(1)
