"""federatls: mutual TLS for Python services across autonomous, federated certificate
authorities that speak step-ca's protocol.

    identity = await federatls.bootstrap(token)       # key in memory, cert, trust bundle
    server_ctx = identity.server_context()            # mTLS, trusting the federation
    client_ctx = identity.client_context()
    peer = identity.peer(writer)                      # who, and anchored in which root
"""

from ._authorise import (
    Authoriser,
    NamePattern,
    all_of,
    allow_names,
    allow_roots,
    any_of,
    authorise_connection,
    root_may_vouch_for,
)
from ._bootstrap import bootstrap, bootstrap_sync
from ._errors import (
    BadMaterialError,
    CARefusedError,
    CATimeoutError,
    CAUnreachableError,
    ConfigError,
    FederatlsError,
    FingerprintMismatchError,
    IdentityExpiredError,
    MissingExtraError,
    PeerNotAuthorisedError,
    TokenError,
)
from ._identity import Identity, TrustChoice
from ._keys import KeyType
from ._peer import PeerInfo, peer_info
from ._policy import RenewalPolicy
from ._renewal import (
    LiveServerContext,
    RenewingIdentity,
    TokenSource,
    keep_renewed,
    keep_renewed_sync,
)
from ._trust import Provenance, TrustBundle, TrustedRoot
from ._version import __version__

__all__ = [
    "Authoriser",
    "BadMaterialError",
    "CARefusedError",
    "CATimeoutError",
    "CAUnreachableError",
    "ConfigError",
    "FederatlsError",
    "FingerprintMismatchError",
    "Identity",
    "IdentityExpiredError",
    "KeyType",
    "LiveServerContext",
    "MissingExtraError",
    "NamePattern",
    "PeerInfo",
    "PeerNotAuthorisedError",
    "Provenance",
    "RenewalPolicy",
    "RenewingIdentity",
    "TokenError",
    "TokenSource",
    "TrustBundle",
    "TrustChoice",
    "TrustedRoot",
    "__version__",
    "all_of",
    "allow_names",
    "allow_roots",
    "any_of",
    "authorise_connection",
    "bootstrap",
    "bootstrap_sync",
    "keep_renewed",
    "keep_renewed_sync",
    "peer_info",
    "root_may_vouch_for",
]
