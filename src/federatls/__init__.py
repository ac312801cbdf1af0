"""federatls: mutual TLS across autonomous, federated certificate authorities."""

from ._errors import (
    BadMaterialError,
    CARefusedError,
    CAUnreachableError,
    ConfigError,
    FederatlsError,
    FingerprintMismatchError,
    PeerNotAuthorisedError,
    TokenError,
)

__version__ = "0.1.0"

__all__ = [
    "BadMaterialError",
    "CARefusedError",
    "CAUnreachableError",
    "ConfigError",
    "FederatlsError",
    "FingerprintMismatchError",
    "PeerNotAuthorisedError",
    "TokenError",
    "__version__",
]
