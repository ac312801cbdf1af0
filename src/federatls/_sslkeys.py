"""``ssl.SSLContext``s from in-memory material: ``tls_context``, the one base every context
here starts from (workload contexts in ``_contexts``, the CA client's, the CA's HTTPS server
and its federation-peer client), and loading an in-memory private key into a context
without a plaintext key file. What each context adds (cipher suites, verification mode,
ALPN, peer checks) belongs to its builder, not here.

This is the one place that works around the stdlib's file-only key loading.
"""

from __future__ import annotations

import os
import secrets
import ssl
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, TypeVar, overload

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ._errors import BadMaterialError
from ._x509 import certs_to_pem

__all__ = ["load_cert_chain_in_memory", "tls_context"]

Ctx = TypeVar("Ctx", bound=ssl.SSLContext)


@overload
def tls_context(
    protocol: int,
    *,
    roots: Sequence[x509.Certificate] | None = None,
    chain: Sequence[x509.Certificate] = (),
    key: PrivateKeyTypes | None = None,
) -> ssl.SSLContext: ...


@overload
def tls_context(
    protocol: int,
    *,
    roots: Sequence[x509.Certificate] | None = None,
    chain: Sequence[x509.Certificate] = (),
    key: PrivateKeyTypes | None = None,
    cls: type[Ctx],
) -> Ctx: ...


def tls_context(
    protocol: int,
    *,
    roots: Sequence[x509.Certificate] | None = None,
    chain: Sequence[x509.Certificate] = (),
    key: PrivateKeyTypes | None = None,
    cls: type[Any] = ssl.SSLContext,
) -> Any:
    """A new context of class ``cls`` for ``protocol`` (``ssl.PROTOCOL_TLS_CLIENT`` or
    ``ssl.PROTOCOL_TLS_SERVER``): TLS 1.2 or newer, no compression, no renegotiation;
    trusting ``roots`` if given (and nothing else: the system store is never loaded);
    presenting ``chain`` (leaf first) with ``key`` if a key is given, the key kept in memory
    (``load_cert_chain_in_memory``). A server context issues no TLS session tickets: a
    resumed session would skip the check of the client's certificate against today's roots.
    Verification mode, hostname checks, cipher suites and ALPN are the caller's."""
    ctx = cls(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if protocol == ssl.PROTOCOL_TLS_SERVER:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    if key is not None:
        load_cert_chain_in_memory(ctx, chain, key)
    if roots is not None:
        ctx.load_verify_locations(cadata=certs_to_pem(roots))
    return ctx


def load_cert_chain_in_memory(
    ctx: ssl.SSLContext, chain: Sequence[x509.Certificate], key: PrivateKeyTypes
) -> None:
    """Load ``chain`` (leaf first) and ``key`` into ``ctx``; the key never touches a disk in
    plaintext.

    CPython's ``SSLContext.load_cert_chain`` only reads paths (CPython gh-60691,
    https://github.com/python/cpython/issues/60691). On Linux the PEM goes into an anonymous
    memory file (``memfd_create``) read back through ``/proc/self/fd/N``: it has no name on
    any file system and vanishes with its descriptor. Elsewhere a temporary file holds the key
    *encrypted* with a random one-time password, and is deleted at once.
    """
    certs = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    if sys.platform == "linux" and hasattr(os, "memfd_create"):
        plain = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.memfd_create("federatls-key", os.MFD_CLOEXEC)
        try:
            view = memoryview(certs + plain)
            while view:
                view = view[os.write(fd, view) :]
            _load(ctx, f"/proc/self/fd/{fd}", None)
        finally:
            os.close(fd)
        return
    password = secrets.token_bytes(32)
    sealed = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    with tempfile.NamedTemporaryFile(prefix="federatls-", suffix=".pem", delete=False) as tmp:
        path = tmp.name
        tmp.write(certs + sealed)
    try:
        _load(ctx, path, password)
    finally:
        os.unlink(path)


def _load(ctx: ssl.SSLContext, path: str, password: bytes | None) -> None:
    try:
        ctx.load_cert_chain(path, password=password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise BadMaterialError("the private key does not match the certificate") from exc
        raise BadMaterialError(f"cannot load the certificate and key: {exc.reason or exc}") from exc
