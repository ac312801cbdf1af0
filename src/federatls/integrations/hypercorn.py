"""hypercorn (asyncio) serving an ASGI app with mutual TLS from a federatls identity (the
``hypercorn`` extra). The TLS context is the identity's server context: it follows renewal
(each new handshake uses the newest certificate and trust bundle) and checks every client
in the handshake (name rules, then the authoriser), so a refused client is cut off before
hypercorn reads a request from it. ALPN offers ``h2`` and ``http/1.1`` (hypercorn's
``alpn_protocols``).

    config = federatls.integrations.hypercorn.config(live, bind="0.0.0.0:8443",
                                                     authoriser=allow_names("*.k8s.internal"))
    await hypercorn.asyncio.serve(app, config)

hypercorn's own TLS settings (certificate and key files, the key's password, CA files,
verification mode and flags, ciphers) are refused with ``ConfigError``, when the config is
made and again when hypercorn asks for its context: the context is the identity's, so they
would be ignored or replace it. So are ``insecure_bind`` (plain HTTP beside the TLS
sockets) and ``quic_bind`` (HTTP/3, whose TLS is aioquic's, built from those files).

What the application can learn of its client: hypercorn (0.16 to 0.18) hands the app its
address (``scope["client"]``) and nothing of the TLS connection (no ASGI ``tls``
extension, no per-connection hook), so there is no ``peer()`` for hypercorn's requests.
Decide per client with the authoriser, which sees the verified ``PeerInfo``.
"""

from __future__ import annotations

import ssl
from typing import Any

from .._authorise import Authoriser
from .._errors import ConfigError, MissingExtraError
from .._identity import TrustChoice
from ._source import Arguments, Source, check_common, passed_on

try:
    from hypercorn.config import Config, Sockets
except ModuleNotFoundError as exc:
    raise MissingExtraError("federatls.integrations.hypercorn", "hypercorn", exc.name) from exc

__all__ = ["FederatlsConfig", "config"]

_WHERE = "federatls.integrations.hypercorn.config"
_OWN_TLS = (
    "would be ignored or replace the identity's TLS context (its certificate, the trust "
    "bundle, renewal, client certificates); instead choose trust= and "
    "require_client_certificate=, and narrow clients with authoriser="
)
# hypercorn's settings that choose TLS material or serve beside federatls's TLS: refused.
_REFUSED: dict[str, str] = {
    **dict.fromkeys(
        (
            "certfile",
            "keyfile",
            "keyfile_password",
            "ca_certs",
            "ciphers",
            "verify_mode",
            "verify_flags",
            "cert_reqs",
        ),
        _OWN_TLS,
    ),
    "insecure_bind": "would serve plain HTTP, without mutual TLS or the authoriser; bind only "
    "TLS sockets (bind=), and serve plain HTTP with a plain hypercorn config if you must",
    "quic_bind": "would serve HTTP/3 over QUIC, whose TLS is aioquic's (from certfile/keyfile), "
    "not the identity's context; serve HTTP/1.1 and HTTP/2 over bind= instead",
}
_ARGS = Arguments(_WHERE, "hypercorn", refused=_REFUSED)  # the rest: hypercorn's settings
_DEFAULTS = Config()  # hypercorn's defaults, to tell a refused setting changed later
_ALPN = frozenset({"h2", "http/1.1"})  # what hypercorn speaks over TLS (HTTP/3 is QUIC's)


class FederatlsConfig(Config):
    """A ``hypercorn.config.Config`` whose TLS is always on and always the identity's
    context (see the module's docstring); every other setting is hypercorn's."""

    def __init__(
        self,
        source: Source,
        authoriser: Authoriser | None,
        trust: TrustChoice,
        require_client_certificate: bool,
    ) -> None:
        check_common(_WHERE, source, trust, authoriser)
        super().__init__()
        self._federatls = (source, authoriser, trust, require_client_certificate)

    @property
    def ssl_enabled(self) -> bool:
        return True

    def _refuse_own_tls(self) -> None:
        """``ConfigError`` for a refused setting changed on this config after it was made."""
        for name in _REFUSED:
            if name == "cert_reqs":  # write-only: it sets verify_mode
                continue
            if getattr(self, name) != getattr(_DEFAULTS, name):
                raise ConfigError(f"{_WHERE}: {name}= {_REFUSED[name]}")
        _check_alpn(self.alpn_protocols)

    def create_sockets(self) -> Sockets:
        self._refuse_own_tls()
        return super().create_sockets()

    def create_ssl_context(self) -> ssl.SSLContext:
        self._refuse_own_tls()
        source, authoriser, trust, require_client_certificate = self._federatls
        ctx = source.server_context(
            trust=trust,
            require_client_certificate=require_client_certificate,
            authoriser=authoriser,
        )
        ctx.set_alpn_protocols(self.alpn_protocols)
        return ctx


def _check_alpn(protocols: Any) -> None:
    if not isinstance(protocols, list | tuple) or not protocols or not set(protocols) <= _ALPN:
        raise ConfigError(
            f"{_WHERE}: alpn_protocols={protocols!r}: hypercorn speaks only "
            f"{sorted(_ALPN)} over TLS; give a non-empty list of those (the default offers both)"
        )


def config(
    source: Source,
    *,
    authoriser: Authoriser | None = None,
    trust: TrustChoice = "federation",
    require_client_certificate: bool = True,
    **hypercorn_config: Any,
) -> FederatlsConfig:
    """A ``hypercorn.config.Config`` serving mutual TLS as ``source`` (an ``Identity`` or a
    ``RenewingIdentity``), clients checked by ``authoriser`` in the handshake; serve it with
    ``hypercorn.asyncio.serve(app, config)``. Other keyword arguments are hypercorn's
    settings (``bind``, ``keep_alive_timeout``...), except its TLS ones, ``insecure_bind`` and
    ``quic_bind`` (a ``ConfigError``, as is a name hypercorn does not know)."""
    cfg = FederatlsConfig(source, authoriser, trust, require_client_certificate)
    for name, value in passed_on(_ARGS, hypercorn_config).items():
        if name.startswith("_") or not hasattr(Config, name):
            raise ConfigError(
                f"{_WHERE}: {name}= is not a hypercorn setting (see hypercorn.config.Config); "
                "it would be ignored"
            )
        setattr(cfg, name, value)
    _check_alpn(cfg.alpn_protocols)
    return cfg
