"""federatls.ca: an online CA that speaks step-ca's wire protocol, with ``federatedRoots``.

``init_pki`` writes a PKI and a ca.json that the real step-ca also runs; ``CAServer`` serves
it. The server needs the ``ca`` extra (aiohttp); it is imported only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import StoreBusyError, StoreUnavailableError
from ._config import CAConfig, ConnectionLimits, DurationClaims, JWKProvisioner
from ._database import Database, copy_store, init_schema, open_store
from ._pki import InitResult, init_pki
from ._rotation import RotationStep, add_root, issue_from_new_root, retire_old_roots
from ._store import (
    IssuedCertificate,
    Revocation,
    RevokeOutcome,
    SQLiteStore,
    Store,
    StoreWouldWait,
    TokenUse,
    without_waiting,
)

if TYPE_CHECKING:
    from ._postgres import PostgresStore
    from ._server import CAServer, serve

__all__ = [
    "CAConfig",
    "CAServer",
    "ConnectionLimits",
    "Database",
    "DurationClaims",
    "InitResult",
    "IssuedCertificate",
    "JWKProvisioner",
    "PostgresStore",
    "Revocation",
    "RevokeOutcome",
    "RotationStep",
    "SQLiteStore",
    "Store",
    "StoreBusyError",
    "StoreUnavailableError",
    "StoreWouldWait",
    "TokenUse",
    "add_root",
    "copy_store",
    "init_pki",
    "init_schema",
    "issue_from_new_root",
    "open_store",
    "retire_old_roots",
    "serve",
    "without_waiting",
]


def __getattr__(name: str) -> Any:
    if name in ("CAServer", "serve"):
        from . import _server

        return getattr(_server, name)
    if name == "PostgresStore":  # imports psycopg, which only a PostgreSQL database needs
        from ._postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module 'federatls.ca' has no attribute {name!r}")
