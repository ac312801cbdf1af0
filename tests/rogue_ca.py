"""A rogue CA for the SDK's tests: a real HTTPS server on 127.0.0.1 that speaks the step-ca
endpoints the SDK uses (``/root/{sha}``, ``/sign``, ``/roots``, ``/federation``, ``/renew``,
``/intermediates``, ``/crl``)
with a real test PKI's root and intermediate, and misbehaves as a test tells it to: it
drips its answers a byte at a time, answers late or with huge bodies, or issues crafted
certificates. Left alone it behaves as step-ca does, so it is its own honest twin.

It runs on an event loop thread of its own, so blocking code (``bootstrap_sync``) and async
tests can both talk to it. Only the step-ca behaviour the SDK relies on is played.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from anyio.from_thread import start_blocking_portal
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federatls._protocol import SignResponse
from federatls._sslkeys import load_cert_chain_in_memory
from federatls._token import Token
from federatls._x509 import cert_sans, certs_to_pem, common_name, load_pem_csr, split_sans

from harness import PASSWORD, PKI

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Issue:
    """What the rogue CA puts in the certificates it issues (at ``/sign`` and ``/renew``),
    times relative to now. The defaults are what step-ca issues: backdated one minute, a day
    long, the token's names (at ``/renew`` the old certificate's), the CSR's key, no CA."""

    not_before: timedelta = timedelta(minutes=-1)
    not_after: timedelta = timedelta(hours=24)
    names: tuple[str, ...] | None = None
    ca: bool = False  # basicConstraints CA:TRUE and keyUsage keyCertSign
    other_key: bool = False  # a key of the CA's choosing instead of the requester's
    # The extended key usages (None: no such extension, which allows any use).
    purposes: tuple[x509.ObjectIdentifier, ...] | None = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    issuer_is_ca: bool = True  # False: signed by an intermediate of the root marked CA:FALSE
    short_chain: bool = False  # True: certChain holds the leaf alone (no intermediate)


@dataclass(frozen=True)
class Behaviour:
    """How the rogue CA answers one endpoint: after ``delay`` seconds, dripping one byte
    every ``drip`` seconds (0: at once), with its JSON body padded to ``pad_to`` bytes (an
    extra field), announced with a Content-Length or, with ``declare_length=False``, chunked;
    with ``gzip``, the body is sent gzip-compressed (whether asked for or not); ``body``, when
    given, is sent instead of the answer (garbage, say); with ``head_at_once``, only the
    body drips."""

    delay: float = 0.0
    drip: float = 0.0
    pad_to: int = 0
    declare_length: bool = True
    gzip: bool = False
    body: bytes | None = None
    head_at_once: bool = False  # True: the status line and headers at once, only the body dripped


@dataclass
class RogueCA:
    """The server. Set ``issue``, ``behaviour[path]`` (``"/root"``, ``"/sign"``, ``"/roots"``,
    ``"/federation"``, ``"/renew"``), ``roots`` (what ``/roots`` and ``/federation`` list),
    ``federated`` (what only ``/federation`` adds) and ``structure`` (what
    ``/federatls/federation`` answers) at any time; ``requests`` lists what reached it,
    ``sent`` the body bytes it got out."""

    pki: PKI
    issue: Issue = field(default_factory=Issue)
    behaviour: dict[str, Behaviour] = field(default_factory=dict)
    roots: list[x509.Certificate] = field(default_factory=list)
    federated: list[x509.Certificate] = field(default_factory=list)
    # What ``/federatls/federation`` answers (status, body); None: 404, as step-ca does.
    structure: tuple[int, dict[str, object]] | None = None
    requests: list[str] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    url: str = ""
    port: int = 0  # where it listens (0: a free port)
    root_answer: x509.Certificate | None = None  # what /root/{sha} answers (None: the PKI's)
    # What ``/intermediates`` answers: None is 404 (step-ca before 0.27.3: no such route);
    # (201, certificates) its list; (501, []) an error body, as a CA that publishes none.
    published: tuple[int, list[x509.Certificate]] | None = None
    # X-Request-Id: the client's echoed (step-ca 0.26 and later); with ``echo=False`` none
    # (before 0.26); ``answer_id``, when given, is sent instead (a hostile value, say).
    echo: bool = True
    answer_id: str | None = None
    request_ids: list[str | None] = field(default_factory=list)  # what each request carried
    # What ``GET /crl`` (with or without ``?pem``) answers, as is, 200; None: 404.
    crl: bytes | None = None

    def __post_init__(self) -> None:
        certs = self.pki.directory / "certs"
        self.intermediate = x509.load_pem_x509_certificate(
            (certs / "intermediate_ca.crt").read_bytes()
        )
        key = serialization.load_pem_private_key(
            (self.pki.directory / "secrets" / "intermediate_ca_key").read_bytes(), PASSWORD
        )
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._key: CertificateIssuerPrivateKeyTypes = key
        self.roots = self.roots or [self.pki.root]
        self._tasks: set[asyncio.Task[None]] = set()
        tls_key = ec.generate_private_key(ec.SECP256R1())
        tls_cert = self.certificate(
            "rogue CA", ["127.0.0.1"], tls_key.public_key(), Issue(not_after=timedelta(hours=1))
        )
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        load_cert_chain_in_memory(self._tls, [tls_cert, self.intermediate], tls_key)
        self._tls.verify_mode = ssl.CERT_OPTIONAL  # a client certificate for /renew
        self._tls.load_verify_locations(cadata=certs_to_pem([self.pki.root]))

    # Running -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator[RogueCA]:
        """Serve on 127.0.0.1 (a free port) from a thread of its own until the block ends;
        ``pki.url`` points at it, so ``pki.token(...)`` names it and pins the PKI's root."""
        with start_blocking_portal() as portal, portal.wrap_async_context_manager(self._serve()):
            self.pki.url = self.url
            yield self

    @contextlib.asynccontextmanager
    async def _serve(self) -> AsyncIterator[None]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await writer.start_tls(self._tls)
            while await self._one_request(reader, writer):
                pass
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ValueError):
            pass  # the client went away (or gave up on a dripping answer)
        except asyncio.CancelledError:
            pass  # shutting down: end quietly (3.11's stream callback logs a cancelled task)
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        line = await reader.readline()
        if not line:
            return False
        method, target, _ = line.decode().split(" ", 2)
        length = 0
        request_id = None
        while (header := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            if name.strip().lower() == "x-request-id":
                request_id = value.strip()
        body = await reader.readexactly(length)
        self.requests.append(f"{method} {target}")
        self.request_ids.append(request_id)
        path = "/" + target.lstrip("/").split("/", 1)[0]
        if method == "GET" and target.split("?")[0] == "/crl" and self.crl is not None:
            head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(self.crl)}\r\n\r\n"
            writer.write(head.encode() + self.crl)
            await writer.drain()
            return True
        status, answer = self._answer(method, path, target, body, writer)
        echoed = self.answer_id if self.answer_id is not None else request_id
        extra = f"x-request-id: {echoed}\r\n" if self.echo and echoed is not None else ""
        await self._send(writer, path, status, answer, extra)
        return True

    # Answers -----------------------------------------------------------------------------------
    def _answer(
        self, method: str, path: str, target: str, body: bytes, writer: asyncio.StreamWriter
    ) -> tuple[int, dict[str, object]]:
        pem = serialization.Encoding.PEM
        if method == "GET" and path == "/root":
            root = self.root_answer or self.pki.root
            return 200, {"ca": root.public_bytes(pem).decode()}
        if method == "GET" and path in ("/roots", "/federation"):
            listed = self.roots + (self.federated if path == "/federation" else [])
            return 201, {"crts": [c.public_bytes(pem).decode() for c in listed]}
        if method == "GET" and target == "/federatls/federation" and self.structure:
            return self.structure
        if method == "GET" and target == "/intermediates" and self.published is not None:
            status, certs = self.published
            if status >= 400:
                return status, {"status": status, "message": "not implemented"}
            return status, {"crts": [c.public_bytes(pem).decode() for c in certs]}
        if method == "POST" and path == "/sign":
            request = json.loads(body)
            token = Token.parse(request["ott"])
            csr = load_pem_csr(request["csr"])
            names = list(token.sans) or [token.subject]
            chain = self.chain(token.subject, names, csr.public_key(), self.issue)
            return 201, SignResponse(chain).to_json()
        if method == "POST" and path == "/renew":
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            if der is None:
                return 400, {"status": 400, "message": "missing client certificate"}
            old = x509.load_der_x509_certificate(der)
            chain = self.chain(
                common_name(old.subject), cert_sans(old).as_strings(), old.public_key(), self.issue
            )
            return 201, SignResponse(chain).to_json()
        return 404, {"status": 404, "message": f"no route for {method} {target}"}

    def signed_crl(self, encoding: serialization.Encoding = serialization.Encoding.DER) -> bytes:
        """A CRL (no entries) signed by the PKI's intermediate, for ``crl``: what an honest
        CA serves."""
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.intermediate.subject)
            .last_update(now)
            .next_update(now + timedelta(hours=1))
        )
        crl = builder.sign(self._key, hashes.SHA256())
        return crl.public_bytes(encoding)

    def chain(
        self, subject: str, names: list[str], public_key: object, issue: Issue
    ) -> tuple[x509.Certificate, ...]:
        """The chain the CA answers with: ``certificate(...)`` and the intermediate that
        signed it (with ``issue.issuer_is_ca=False``, one the root made CA:FALSE; with
        ``issue.short_chain``, the leaf alone)."""
        if issue.short_chain:
            return (self.certificate(subject, names, public_key, issue),)
        if issue.issuer_is_ca:
            return self.certificate(subject, names, public_key, issue), self.intermediate
        root_key = serialization.load_pem_private_key(
            (self.pki.directory / "secrets" / "root_ca_key").read_bytes(), PASSWORD
        )
        assert isinstance(root_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        not_a_ca = Issue(names=(), purposes=None)
        inter = self.certificate(
            "not a CA", [], key.public_key(), not_a_ca, signer=(self.pki.root.subject, root_key)
        )
        leaf = self.certificate(subject, names, public_key, issue, signer=(inter.subject, key))
        return leaf, inter

    def certificate(
        self,
        subject: str,
        names: list[str],
        public_key: object,
        issue: Issue,
        *,
        signer: tuple[x509.Name, CertificateIssuerPrivateKeyTypes] | None = None,
    ) -> x509.Certificate:
        """A certificate from the PKI's intermediate (or ``signer``: its name and key) for
        ``subject`` (CN) and ``names``, filled in as ``issue`` says."""
        if issue.other_key:
            public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        issuer, signing_key = signer or (self.intermediate.subject, self._key)
        now = datetime.now(UTC)
        sans = split_sans(list(issue.names) if issue.names is not None else names)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + issue.not_before)
            .not_valid_after(now + issue.not_after)
            .add_extension(x509.BasicConstraints(ca=issue.ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=issue.ca,
                    crl_sign=issue.ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(sans.general_names()), critical=False
            )
        if issue.purposes is not None:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(list(issue.purposes)), critical=False
            )
        return builder.sign(signing_key, hashes.SHA256())

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        path: str,
        status: int,
        answer: dict[str, object],
        extra: str = "",
    ) -> None:
        how = self.behaviour.get(path, Behaviour())
        data = json.dumps(answer).encode() if how.body is None else how.body
        prefix = b'{"pad":"'
        filler = max(how.pad_to - len(prefix) - len(data) - 1, 0) if how.pad_to else 0
        pieces: list[bytes | _Filler] = (
            [prefix, _Filler(filler), b'",' + data[1:]] if how.pad_to else [data]
        )
        framing = "content-type: application/json\r\n" + extra
        if how.gzip:
            packer = zlib.compressobj(wbits=31)  # the gzip format
            packed = [packer.compress(c) for p in pieces for c in _chunks(p)] + [packer.flush()]
            pieces = [b"".join(packed)]
            framing += "content-encoding: gzip\r\n"
        size = sum(len(p) for p in pieces)
        framing += f"content-length: {size}" if how.declare_length else "transfer-encoding: chunked"
        head = f"HTTP/1.1 {status} X\r\n{framing}\r\n\r\n".encode()
        await asyncio.sleep(how.delay)
        self.sent[path] = 0
        await self._write(writer, head, 0.0 if how.head_at_once else how.drip)
        for piece in pieces:
            for chunk in _chunks(piece):
                framed = chunk if how.declare_length else b"%x\r\n%s\r\n" % (len(chunk), chunk)
                await self._write(writer, framed, how.drip)
                self.sent[path] += len(chunk)
        if not how.declare_length:
            await self._write(writer, b"0\r\n\r\n", how.drip)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes, drip: float) -> None:
        if not drip:
            writer.write(data)
            await writer.drain()
            return
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(drip)


def _chunks(piece: bytes | _Filler) -> Iterator[bytes]:
    return piece.chunks() if isinstance(piece, _Filler) else iter([piece])


@dataclass(frozen=True)
class _Filler:
    """``size`` bytes of ``x``, made a chunk at a time (a 50 MB body is never held whole)."""

    size: int

    def __len__(self) -> int:
        return self.size

    def chunks(self) -> Iterator[bytes]:
        left = self.size
        while left > 0:
            yield b"x" * min(CHUNK, left)
            left -= CHUNK
