"""JWK provisioner keys: generation, RFC 7638 key ids, and the password-protected form step
keeps in ca.json (``encryptedKey``: a PBES2-HS256+A128KW / A256GCM compact JWE of the
private JWK). All JOSE work is done by joserfc; nothing here touches the disk or the clock.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from ._errors import BadMaterialError
from ._keys import EC_CURVES

__all__ = ["ProvisionerKey", "PublicJWK", "jwk_thumbprint"]

# Algorithms a JWK provisioner key may use, by key type and curve (what step supports).
_EC_ALGS = {crv: alg for crv, (_, alg) in EC_CURVES.items()}
_SIGNING_ALGS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)
_KEY_WRAP = "PBES2-HS256+A128KW"
_CONTENT_ENC = "A256GCM"
# step's `jose.EncryptJWK` uses 100 000 PBKDF2 iterations; joserfc refuses more than 300 000.
_P2C = 100_000
_JWE_REGISTRY = jwe.JWERegistry(algorithms=[_KEY_WRAP, _CONTENT_ENC])

AnyJWK = ECKey | RSAKey | OKPKey


def _import_jwk(data: Mapping[str, Any], what: str) -> AnyJWK:
    kty = data.get("kty")
    try:
        if kty == "EC":
            return ECKey.import_key(dict(data))
        if kty == "RSA":
            return RSAKey.import_key(dict(data))
        if kty == "OKP":
            return OKPKey.import_key(dict(data))
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise BadMaterialError(f"{what}: not a valid {kty} JWK: {exc}") from exc
    raise BadMaterialError(f"{what}: unsupported JWK key type {kty!r} (want EC, RSA or OKP)")


def _default_alg(key: AnyJWK) -> str:
    if isinstance(key, ECKey):
        alg = _EC_ALGS.get(str(key.as_dict().get("crv")))
        if alg is None:
            raise BadMaterialError(f"unsupported EC curve {key.as_dict().get('crv')!r}")
        return alg
    if isinstance(key, RSAKey):
        return "RS256"
    return "EdDSA"


def jwk_thumbprint(data: Mapping[str, Any]) -> str:
    """The base64url SHA-256 RFC 7638 thumbprint of a JWK: step's provisioner ``kid``."""
    return _import_jwk(data, "jwk").thumbprint()


@dataclass(frozen=True)
class PublicJWK:
    """A provisioner's public key, as it stands in ca.json and in ``/provisioners``."""

    key: AnyJWK
    kid: str
    alg: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], what: str = "provisioner key") -> PublicJWK:
        """Parse a public JWK; ``kid`` and ``alg`` default to the thumbprint and the key's alg."""
        if not isinstance(data, Mapping):
            raise BadMaterialError(f"{what}: a JWK must be a JSON object")
        if "d" in data:
            raise BadMaterialError(f"{what}: holds a private key where a public one belongs")
        key = _import_jwk(data, what)
        alg = str(data.get("alg") or _default_alg(key))
        if alg not in _SIGNING_ALGS:
            raise BadMaterialError(f"{what}: unsupported signing algorithm {alg!r}")
        kid = str(data.get("kid") or key.thumbprint())
        return cls(key=key, kid=kid, alg=alg)

    def as_dict(self) -> dict[str, Any]:
        """The public JWK in step's field order: use, kty, kid, crv, alg, then the key."""
        raw = self.key.as_dict(private=False)
        out: dict[str, Any] = {"use": "sig", "kty": raw["kty"], "kid": self.kid}
        if "crv" in raw:
            out["crv"] = raw["crv"]
        out["alg"] = self.alg
        out.update({k: v for k, v in raw.items() if k not in out})
        return out


@dataclass(frozen=True)
class ProvisionerKey:
    """A provisioner's private key: it signs one-time tokens. Held in memory only."""

    key: AnyJWK
    kid: str
    alg: str

    @classmethod
    def generate(cls) -> ProvisionerKey:
        """A new P-256 key (ES256), with the RFC 7638 thumbprint as its ``kid``, as step makes."""
        key = ECKey.generate_key("P-256", private=True)
        return cls(key=key, kid=key.thumbprint(), alg="ES256")

    @property
    def public(self) -> PublicJWK:
        """The public half, with the same ``kid`` and ``alg``."""
        pub = _import_jwk(self.key.as_dict(private=False), "provisioner key")
        return PublicJWK(key=pub, kid=self.kid, alg=self.alg)

    def encrypt(self, password: bytes) -> str:
        """The private JWK as step's ``encryptedKey``: compact JWE, PBES2-HS256+A128KW, A256GCM."""
        if not password:
            raise BadMaterialError("the provisioner password must not be empty")
        jwk = self.public.as_dict()
        jwk.update({k: v for k, v in self.key.as_dict(private=True).items() if k not in jwk})
        plaintext = json.dumps(jwk, separators=(",", ":"))
        header = {"alg": _KEY_WRAP, "cty": "jwk+json", "enc": _CONTENT_ENC, "p2c": _P2C}
        return jwe.encrypt_compact(
            header, plaintext, _password_key(password), registry=_JWE_REGISTRY
        )

    @classmethod
    def decrypt(cls, encrypted_key: str, password: bytes) -> ProvisionerKey:
        """Open an ``encryptedKey``; a wrong password raises ``BadMaterialError``."""
        if not isinstance(encrypted_key, str) or encrypted_key.count(".") != 4:
            raise BadMaterialError("encryptedKey is not a compact JWE (five dot-separated parts)")
        try:
            obj = jwe.decrypt_compact(
                encrypted_key, _password_key(password), registry=_JWE_REGISTRY
            )
        except (JoseError, ValueError, TypeError) as exc:
            raise BadMaterialError(
                "cannot decrypt the provisioner key: wrong password, or the key is damaged"
            ) from exc
        try:
            data = json.loads(obj.plaintext or b"")
        except ValueError as exc:
            raise BadMaterialError("the decrypted provisioner key is not a JSON JWK") from exc
        if not isinstance(data, dict) or "d" not in data:
            raise BadMaterialError("the decrypted provisioner key is not a private JWK")
        key = _import_jwk(data, "provisioner key")
        alg = str(data.get("alg") or _default_alg(key))
        kid = str(data.get("kid") or key.thumbprint())
        return cls(key=key, kid=kid, alg=alg)


def _password_key(password: bytes) -> OctKey:
    # joserfc warns about "short keys"; a password is not a raw key (PBKDF2 stretches it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return OctKey.import_key(password)
