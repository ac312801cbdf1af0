"""Loading an in-memory private key into an ``ssl.SSLContext`` without a plaintext key file.

This is the one place that works around the stdlib's file-only key loading.
"""

from __future__ import annotations

import os
import secrets
import ssl
import sys
import tempfile
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ._errors import BadMaterialError

__all__ = ["load_cert_chain_in_memory"]


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
