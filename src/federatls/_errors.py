"""The one exception tree of federatls.

Every error federatls raises on purpose is a ``FederatlsError``. Foreign errors (httpx, ssl,
cryptography, joserfc) are translated where they happen, with ``raise ... from exc``, so a
caller never needs to catch another library's exceptions.

    FederatlsError
    ├── ConfigError              a configuration file or argument is wrong
    ├── MissingExtraError        an optional part's dependencies are not installed (also an
    │                            ImportError): the message names the extra, federatls[ca]
    ├── BadMaterialError         a token, PEM, key or CA answer cannot be used
    │   ├── TokenError           a one-time token is malformed or lacks a claim
    │   └── FingerprintMismatchError
    │                            the CA served a root whose SHA-256 is not the pinned one
    ├── CARefusedError           the CA answered with an error status (status, body)
    ├── CAUnreachableError       no answer from the CA (connect, TLS or timeout failure)
    │   └── CATimeoutError       no complete answer within the deadline (silent or dripping)
    ├── IdentityExpiredError     the certificate expired before it could be renewed
    ├── PeerFetchError           a CA could not fetch, or could not authenticate, the roots
    │                            of a federation peer it follows (which peer, and why)
    ├── StoreBusyError           the CA's database stayed locked too long (the CA answers 503)
    │   └── StoreUnavailableError
    │                            the CA's database cannot be reached now (also a 503)
    └── PeerNotAuthorisedError   a TLS peer is valid but not allowed by an authoriser
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadMaterialError",
    "CARefusedError",
    "CATimeoutError",
    "CAUnreachableError",
    "ConfigError",
    "FederatlsError",
    "FingerprintMismatchError",
    "IdentityExpiredError",
    "MissingExtraError",
    "PeerFetchError",
    "PeerNotAuthorisedError",
    "StoreBusyError",
    "StoreUnavailableError",
    "TokenError",
]


class FederatlsError(Exception):
    """Root of every error federatls raises on purpose."""


class ConfigError(FederatlsError):
    """A configuration file (ca.json, a password file) or an argument is wrong."""


class MissingExtraError(FederatlsError, ImportError):
    """``what`` needs the optional dependencies of ``extra`` (``federatls[extra]``), and they
    are not installed. ``missing`` is the module that could not be imported."""

    def __init__(self, what: str, extra: str, missing: str | None) -> None:
        self.extra = extra
        self.missing = missing
        super().__init__(
            f"{what} needs the '{extra}' extra ({missing or 'its dependencies'} is not "
            f"installed): install federatls[{extra}], or pip install -e '.[{extra}]' "
            "in a checkout",
            name=missing,
        )


class BadMaterialError(FederatlsError):
    """A token, certificate, key or CA answer is malformed or unusable."""


class TokenError(BadMaterialError):
    """A one-time token is malformed, or lacks a claim the operation needs."""


class FingerprintMismatchError(BadMaterialError):
    """The CA served a root certificate whose SHA-256 fingerprint is not the expected one.

    Nothing more is sent to that CA: it is not the CA the token vouches for.
    """

    def __init__(self, expected: str, actual: str, url: str) -> None:
        self.expected = expected
        self.actual = actual
        self.url = url
        super().__init__(
            f"root certificate served by {url} has fingerprint {actual}, "
            f"but {expected} was expected: refusing to talk to this CA"
        )


class CARefusedError(FederatlsError):
    """The CA answered with an error status.

    ``status`` is the HTTP status; ``message`` the CA's (step-ca style) error message;
    ``body`` the decoded JSON body when there was one; ``request_id`` the id the CA echoed
    in ``X-Request-Id`` (step-ca 0.26 and later; None from older CAs), which its log line for
    the request carries too.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        url: str,
        body: dict[str, Any] | None = None,
        hint: str = "",
        request_id: str | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.url = url
        self.body = body
        self.hint = hint
        self.request_id = request_id
        text = f"CA refused {url} with {status}: {message}"
        if request_id is not None:
            text += f" [request id {request_id}]"
        super().__init__(f"{text} ({hint})" if hint else text)

    def with_hint(self, hint: str) -> CARefusedError:
        """The same refusal, saying ``hint`` (why a CA may refuse so, what to do)."""
        return CARefusedError(
            self.status,
            self.message,
            url=self.url,
            body=self.body,
            hint=hint,
            request_id=self.request_id,
        )


class CAUnreachableError(FederatlsError):
    """The CA could not be reached: connection refused, TLS failure or timeout.
    ``request_id`` is the id the CA echoed when an answer had begun to arrive (its headers)
    before the failure, else None."""

    def __init__(self, url: str, reason: str, *, request_id: str | None = None) -> None:
        self.url = url
        self.reason = reason
        self.request_id = request_id
        text = f"cannot reach the CA at {url}: {reason}"
        if request_id is not None:
            text += f" [request id {request_id}]"
        super().__init__(text)


class CATimeoutError(CAUnreachableError):
    """The CA's complete answer did not arrive within the deadline: ``timeout`` seconds for
    ``what`` (one call, a whole bootstrap or a renewal). A CA that drips its answer a byte at
    a time ends here as surely as a silent one."""

    def __init__(
        self, url: str, timeout: float, what: str, *, request_id: str | None = None
    ) -> None:
        self.timeout = timeout
        self.what = what
        super().__init__(
            url,
            f"no complete answer within the {timeout:g} s deadline of {what}",
            request_id=request_id,
        )


class IdentityExpiredError(FederatlsError):
    """The certificate expired before it could be renewed: renewal over mutual TLS needs a
    valid certificate (a CA refuses an expired one with 401 "certificate expired on ...", or
    at the TLS handshake), and the CA did not renew it with a renew token either (its
    provisioner does not allow renewal after expiry). Enrol again with a new token, or give
    the renewal a token source."""


class PeerFetchError(FederatlsError):
    """A CA following a federation peer by URL got no roots it may trust from it this time:
    the peer could not be reached, its answer was malformed, or it was not authenticated by
    the pinned fingerprint (first contact) or by the peer roots trusted now. ``peer`` is the
    peer's name, ``reason`` says why; the CA keeps the peer's last good roots."""

    def __init__(self, peer: str, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"federation peer {peer!r}: {reason}")


class StoreBusyError(FederatlsError):
    """The CA's database could not be had in time (another process holds its lock): the
    operation did nothing, and the CA answers 503 so that the client retries later."""


class StoreUnavailableError(StoreBusyError):
    """The CA's database cannot be reached now (a PostgreSQL server down, or the connection
    to it lost): the operation recorded nothing, or its outcome is unknown and the CA hands
    out nothing for it; the CA answers 503 as for ``StoreBusyError``, and the store
    reconnects by itself once the database is back. The message says what is wrong."""


class PeerNotAuthorisedError(FederatlsError):
    """A TLS peer presented a valid certificate, but an authoriser refused it. ``peer`` is the
    ``PeerInfo`` that was refused."""

    def __init__(self, message: str, *, peer: Any = None) -> None:
        self.peer = peer
        super().__init__(message)
