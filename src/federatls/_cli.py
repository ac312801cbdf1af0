"""The ``federatls`` command: ``federatls ca init|serve|token|certificate|renew|revoke|roots|
federation|peers|health|rotate`` in the spirit of ``step ca``, ``federatls ca db init|migrate``, and
``federatls demo``.

Errors are one line on stderr and a non-zero exit: 2 for a usage mistake (argparse's own, or
a ``UsageError``: flags missing or contradicting each other, a malformed value), 1 for a
failure at run time. Files are written whole or not at all; key files are created with mode
0600.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import getpass
import logging
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ._bootstrap import completed_chain, sign_checked
from ._client import DEFAULT_TIMEOUT, CAClient, Deadline, _base_url, fetch_root
from ._duration import parse_go_duration
from ._errors import (
    BadMaterialError,
    ConfigError,
    FederatlsError,
    IdentityExpiredError,
    MissingExtraError,
)
from ._files import write_all_atomic
from ._issuance import check_renewed
from ._jwk import ProvisionerKey
from ._keys import KeyType, PrivateKey, build_csr, new_private_key
from ._protocol import RevokeRequest, SignRequest, TimeDuration, parse_serial
from ._token import (
    DEFAULT_VALIDITY,
    MAX_VALIDITY,
    MIN_VALIDITY,
    Token,
    mint_token,
    revoke_audience,
    sign_audience,
)
from ._trust import TrustBundle
from ._version import __version__
from ._x509 import certs_to_pem, fingerprint, load_pem_certificates, load_pem_csr

if TYPE_CHECKING:
    from .ca._database import Database

__all__ = ["main"]

log = logging.getLogger("federatls.cli")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class UsageError(ConfigError):
    """A usage mistake argparse cannot see alone (flags that go together, a flag one verb
    needs): reported like argparse's own, exit status 2."""


_T = TypeVar("_T")


# Argument types: a malformed value is a usage mistake (argparse reports it, exit 2).
def _usage_type(
    *errors: type[Exception],
) -> Callable[[Callable[[str], _T]], Callable[[str], _T]]:
    """An argparse type from a parser: the ``errors`` it raises become usage mistakes."""

    def wrap(parse: Callable[[str], _T]) -> Callable[[str], _T]:
        @functools.wraps(parse)
        def checked(text: str) -> _T:
            try:
                return parse(text)
            except errors as exc:
                raise argparse.ArgumentTypeError(str(exc)) from exc

        return checked

    return wrap


@_usage_type(BadMaterialError)
def _https_url(text: str) -> str:
    _base_url(text)
    return text


@_usage_type(ValueError)
def _key_type(text: str) -> KeyType:
    return KeyType.parse(text)


@_usage_type(ValueError)
def _token_validity(text: str) -> timedelta:
    validity = parse_go_duration(text)
    if not MIN_VALIDITY <= validity <= MAX_VALIDITY:
        raise ValueError(
            f"token validity must be between {MIN_VALIDITY} and {MAX_VALIDITY}, not {validity}"
        )
    return validity


@_usage_type(ValueError)
def _time_or_duration(text: str) -> TimeDuration | None:
    return TimeDuration.parse(text)


_MAX_CSR_FILE = 1024 * 1024  # far above any certificate request; /dev/zero is not read whole


def _cnf_file(path: str) -> x509.CertificateSigningRequest:
    """The certificate request a token binds (``--cnf-file``): PEM or DER, signature checked,
    so a token is never bound to a request no CA would sign. A file that cannot be read or is
    no such request is a failure at run time (exit 1), as for ``--root``."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(_MAX_CSR_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read certificate request {path}: {exc.strerror}") from exc
    if len(data) > _MAX_CSR_FILE:
        raise ConfigError(f"{path} is over {_MAX_CSR_FILE} bytes: not a certificate request")
    try:
        csr = load_pem_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data)
        valid = csr.is_signature_valid
    except BadMaterialError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not a certificate request (PEM or DER)") from exc
    if not valid:
        raise ConfigError(f"{path}: the certificate request's signature does not verify")
    return csr


@_usage_type(ConfigError)
def _address(text: str) -> str:
    from .ca._config import split_address

    split_address(text)
    return text


@_usage_type(ValueError)
def _permit_dns(text: str) -> x509.GeneralName:
    from .ca._constraints import dns_subtree

    return dns_subtree(text)


@_usage_type(ValueError)
def _permit_uri_domain(text: str) -> x509.GeneralName:
    from .ca._constraints import uri_subtree

    return uri_subtree(text)


@_usage_type(ValueError)
def _permit_ip(text: str) -> x509.GeneralName:
    from .ca._constraints import ip_subtree

    return ip_subtree(text)


@_usage_type(ValueError)
def _permit_email(text: str) -> x509.GeneralName:
    from .ca._constraints import email_subtree

    return email_subtree(text)


@_usage_type(ConfigError)
def _database_url(text: str) -> Database:
    from .ca._database import Database

    return Database.postgresql(text)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 3600")
    return seconds


def _workers(text: str) -> int:
    from .ca._workers import MAX_WORKERS

    if not re.fullmatch(r"[0-9]{1,9}", text.strip()) or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of worker processes from 1 to {MAX_WORKERS}"
        )
    return int(text)


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a name cannot be empty")
    return text


def _decimal_serial(text: str) -> str:
    """A serial as step-ca 0.22+ reads it (decimal, or 0x hex), sent in decimal: what every
    step-ca generation, and a revoke token's ``sub``, compares with."""
    decimal = parse_serial(text)
    if decimal is None or decimal.startswith("-"):
        raise argparse.ArgumentTypeError(
            f"serial {text!r} must be a decimal number, as step prints serials, or 0x hex"
        )
    return decimal


def _need_ca_extra(what: str) -> None:
    """``MissingExtraError`` naming ``federatls[ca]`` when aiohttp is not installed."""
    try:
        import aiohttp  # noqa: F401
    except ModuleNotFoundError as exc:
        raise MissingExtraError(what, "ca", exc.name) from exc


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


# Reading and writing files -----------------------------------------------------------------
def read_password(path: str | None, prompt: str, *, confirm: bool = False) -> bytes:
    """The password from a file (trailing whitespace trimmed, as step does) or a prompt."""
    if path is not None:
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read password file {path}: {exc.strerror}") from exc
        password = text.rstrip()
        if not password:
            raise ConfigError(f"password file {path} is empty")
        return password
    if not sys.stdin.isatty():
        raise ConfigError("a password is needed: give --password-file (no terminal to ask on)")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Confirm the password: ") != first:
        raise ConfigError("the passwords do not match")
    if not first:
        raise ConfigError("the password cannot be empty")
    return first.encode()


def _read_certs(path: str, what: str) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    return load_pem_certificates(data, f"{what} {path}")


def _read_key(path: str) -> PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BadMaterialError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, PrivateKey):
        raise BadMaterialError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def _write_atomic(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename:
    readers see the old file or the new one, never half of one."""
    _write_all([(path, data, private)], force=force)


def _check_writable(path: Path, *, force: bool) -> None:
    """Refuse, before anything is asked of a CA, a ``path`` that cannot be written: one that
    exists (without ``force``) or is a directory (whatever ``force``), or whose directory
    does not exist."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: give the path of a file")
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists: use --force to overwrite it")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ConfigError(f"directory {directory} does not exist")


def _write_all(files: Sequence[tuple[Path, bytes, bool]], *, force: bool) -> None:
    """Write each ``(path, data, private)`` (mode 0600 if private, else 0644) as
    ``_files.write_all_atomic`` does, all or none, once every path is writable."""
    for path, _, _ in files:
        _check_writable(path, force=force)
    write_all_atomic([(path, data, 0o600 if private else 0o644) for path, data, private in files])


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# Reaching a CA -----------------------------------------------------------------------------
def _root_for(args: argparse.Namespace) -> x509.Certificate:
    if not args.root:
        raise UsageError("--root is required: the root certificate of the CA")
    return _read_certs(args.root, "root certificate")[0]


def _require_ca(args: argparse.Namespace) -> None:
    """``UsageError`` unless --ca-url and --root are both given."""
    if not args.ca_url:
        raise UsageError(
            "--ca-url is required: the URL of the CA, for example https://127.0.0.1:9000"
        )
    if not args.root:
        raise UsageError("--root is required: the root certificate of the CA")


def _deadline(args: argparse.Namespace) -> Deadline:
    """--timeout from now: the deadline of the command's exchange with the CA, all its calls
    together (started after any password prompt; call it in the event loop)."""
    return Deadline.after(args.timeout, "the command (--timeout)")


def _client(
    args: argparse.Namespace,
    identity: tuple[Sequence[x509.Certificate], PrivateKey] | None = None,
    *,
    deadline: Deadline | None = None,
) -> CAClient:
    _require_ca(args)
    return CAClient(
        args.ca_url,
        _read_certs(args.root, "root certificate"),
        identity=identity,
        timeout=args.timeout,
        deadline=deadline,
    )


async def _provisioner_key(
    ca: CAClient, name: str | None, password_file: str | None
) -> tuple[str, ProvisionerKey]:
    provisioners = [p for p in await ca.provisioners() if str(p.get("type", "")).upper() == "JWK"]
    return await _choose_and_decrypt(provisioners, name, password_file, ca)


async def _choose_and_decrypt(
    provisioners: list[dict[str, Any]],
    name: str | None,
    password_file: str | None,
    ca: CAClient | None,
) -> tuple[str, ProvisionerKey]:
    if name is not None:
        provisioners = [p for p in provisioners if p.get("name") == name]
        if not provisioners:
            raise ConfigError(f"the CA has no JWK provisioner named {name!r}")
    if not provisioners:
        raise ConfigError("the CA has no JWK provisioner")
    if len(provisioners) > 1:
        names = ", ".join(sorted(str(p.get("name")) for p in provisioners))
        raise ConfigError(
            f"the CA has several JWK provisioners ({names}): choose one with --provisioner"
        )
    prov = provisioners[0]
    encrypted = prov.get("encryptedKey")
    if not encrypted and ca is not None:
        encrypted = await ca.encrypted_key(str(prov.get("key", {}).get("kid", "")))
    if not isinstance(encrypted, str) or not encrypted:
        raise ConfigError(f"provisioner {prov.get('name')!r} has no encrypted key to sign with")
    password = read_password(
        password_file, "Please enter the password to decrypt the provisioner key: "
    )
    return str(prov["name"]), ProvisionerKey.decrypt(encrypted, password)


async def _mint(
    args: argparse.Namespace,
    subject: str,
    *,
    revoke: bool = False,
    csr: x509.CertificateSigningRequest | None = None,
) -> str:
    """A token for ``subject`` (bound to ``csr`` if given): from a running CA (--ca-url/--root)
    or a ca.json (--offline)."""
    now = datetime.now(UTC)
    if getattr(args, "offline", None):
        from .ca._config import CAConfig

        config = CAConfig.load(args.offline)
        provs = [dict(p.raw) for p in config.provisioners]
        name, key = await _choose_and_decrypt(provs, args.provisioner, args.password_file, None)
        root = _read_certs(str(config.roots[0]), "root certificate")[0]
        host = config.audience_hosts[0]
        port = config.address.rpartition(":")[2]
        ca_url = args.ca_url or f"https://{host}:{port}"
    else:
        root = _root_for(args)
        async with _client(args) as ca:
            name, key = await _provisioner_key(ca, args.provisioner, args.password_file)
        ca_url = args.ca_url
    audience = revoke_audience(ca_url) if revoke else sign_audience(ca_url)
    sans = [] if revoke else (args.san or [])
    return mint_token(
        key,
        issuer=name,
        subject=subject,
        audience=audience,
        now=now,
        sans=sans,
        root_fingerprint=fingerprint(root),
        validity=getattr(args, "token_not_after", None) or DEFAULT_VALIDITY,
        csr=csr,
    )


# Commands ----------------------------------------------------------------------------------
def _make_parents(directory: Path) -> list[Path]:
    """Create the missing parents of ``directory``, each with mode 0700 (they will hold CA
    keys); existing ones are left as they are. Returns those made, outermost first.
    ``ConfigError`` when the nearest existing one is not a directory (a file in the way)."""
    missing = [p for p in reversed(directory.absolute().parents) if not p.exists()]
    nearest = next((p for p in directory.absolute().parents if p.exists()), None)
    if nearest is not None and not nearest.is_dir():
        raise ConfigError(f"{nearest} is not a directory: cannot make {directory} in it")
    for made, path in enumerate(missing):
        try:
            path.mkdir(mode=0o700)
            path.chmod(0o700)  # mkdir's mode is masked by the umask
        except OSError as exc:
            _remove_made(missing[:made])
            raise ConfigError(f"cannot create directory {path}: {exc.strerror or exc}") from exc
    return missing


def _remove_made(made: list[Path]) -> None:
    for path in reversed(made):
        with contextlib.suppress(OSError):
            path.rmdir()  # only if still empty


def cmd_init(args: argparse.Namespace) -> int:
    from .ca._constraints import permitted_subtrees
    from .ca._pki import init_pki, own_names_refusal

    constraints = permitted_subtrees(
        [*args.permit_dns, *args.permit_uri_domain, *args.permit_ip, *args.permit_email]
    )
    refusal = own_names_refusal(constraints, args.address, args.dns or ())
    if refusal is not None:  # a usage mistake: --dns (or --address) against --permit-*
        raise UsageError(refusal)
    password = read_password(
        args.password_file, "Please enter the password to encrypt the CA keys: ", confirm=True
    )
    made = _make_parents(Path(args.dir))
    try:
        result = init_pki(
            args.name,
            Path(args.dir),
            address=args.address,
            password=password,
            now=datetime.now(UTC),
            dns_names=args.dns or (),
            provisioner=args.provisioner,
            name_constraints=constraints,
        )
    except BaseException:
        _remove_made(made)  # a failed init leaves nothing behind, parents included
        raise
    print(f"Root certificate: {result.root}")
    print(f"Root fingerprint: {result.root_fingerprint}")
    print(f"CA configuration: {result.config}")
    print(f"Provisioner: {result.provisioner} (kid {result.provisioner_kid})")
    print(f"CA URL: {result.ca_url}")
    return 0


class _NotTheReadyLine(logging.Filter):
    """Drops the CA's own "serving HTTPS on" log record: `ca serve` prints that line once,
    on standard output, for whoever waits for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .ca._server import READY_RECORD

        return not getattr(record, READY_RECORD, False)


def cmd_serve(args: argparse.Namespace) -> int:
    _need_ca_extra("federatls ca serve")
    from .ca._server import Serving, serve

    password = read_password(
        args.password_file, "Please enter the password to decrypt the intermediate CA key: "
    )

    def ready(ca: Serving) -> None:
        print(f"Serving HTTPS on {ca.url} (root fingerprint {ca.root_fingerprint})", flush=True)

    handlers = logging.getLogger().handlers  # where every federatls record ends up
    quiet = _NotTheReadyLine()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        _run(serve(args.config, password, ready=ready, workers=args.workers, database=args.db))
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)
    return 0


def cmd_db_init(args: argparse.Namespace) -> int:
    _need_ca_extra("federatls ca db init")
    from .ca._config import CAConfig
    from .ca._database import init_schema

    database = args.db or CAConfig.load(args.config).database
    print(init_schema(database))
    return 0


def cmd_db_migrate(args: argparse.Namespace) -> int:
    _need_ca_extra("federatls ca db migrate")
    from .ca._config import CAConfig
    from .ca._database import copy_store

    source = CAConfig.load(args.config).store_path
    if not source.is_file():
        raise ConfigError(f"{source} does not exist: there is no SQLite state to migrate")
    target: Database = args.to
    counts = copy_store(source, target)
    copied = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in counts.items())
    print(f"Copied {copied} from {source} to {target.describe()}.")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    if not args.offline and not args.ca_url:
        raise UsageError("give --ca-url and --root of a running CA, or --offline CA.JSON")
    if args.revoke and args.cnf_file is not None:
        raise UsageError("--cnf-file binds a sign token to a request: not with --revoke")
    subject = args.subject
    if args.revoke:  # the token's sub must be the decimal serial (step-ca 0.29)
        try:
            subject = _decimal_serial(subject)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(str(exc)) from None
    csr = _cnf_file(args.cnf_file) if args.cnf_file is not None else None
    print(_run(_mint(args, subject, revoke=args.revoke, csr=csr)))
    return 0


def cmd_certificate(args: argparse.Namespace) -> int:
    crt_path, key_path = Path(args.crt), Path(args.key)
    for path in (crt_path, key_path):  # before the token is spent
        _check_writable(path, force=args.force)
    kind = args.kty

    async def go() -> tuple[Sequence[x509.Certificate], PrivateKey]:
        if args.token:
            token = Token.parse(args.token)
            if token.subject != args.subject:
                raise ConfigError(f"the token is for {token.subject!r}, not {args.subject!r}")
            deadline = _deadline(args)
            ca_url = args.ca_url or token.ca_url()
            if args.root:
                root = _root_for(args)
            elif token.root_fingerprint:
                root = await fetch_root(
                    ca_url, token.root_fingerprint, timeout=args.timeout, deadline=deadline
                )
            else:
                raise ConfigError("the token has no 'sha' claim: give --root")
            raw, sans = args.token, list(token.sans) or [token.subject]
        else:
            raw = await _mint(args, args.subject)
            deadline = _deadline(args)
            root, ca_url, sans = _root_for(args), args.ca_url, args.san or [args.subject]
        key = new_private_key(kind)
        request = SignRequest(
            build_csr(key, args.subject, sans), raw, args.not_before, args.not_after
        )
        async with CAClient(ca_url, [root], timeout=args.timeout, deadline=deadline) as ca:
            chain, _ = await sign_checked(ca, request, key=key, names=sans, pinned=root)
        return chain, key

    chain, key = _run(go())
    _write_all(
        [(key_path, _key_pem(key), True), (crt_path, certs_to_pem(chain).encode(), False)],
        force=args.force,
    )
    print(f"Certificate: {crt_path}")
    print(f"Private Key: {key_path}")
    return 0


def cmd_renew(args: argparse.Namespace) -> int:
    _require_ca(args)
    chain = _read_certs(args.crt, "certificate")
    key = _read_key(args.key)
    out = Path(args.out) if args.out else Path(args.crt)
    _check_writable(out, force=args.force or out == Path(args.crt))
    ended = chain[0].not_valid_after_utc
    if ended <= datetime.now(UTC):  # the handshake would fail, told as "cannot reach the CA"
        raise IdentityExpiredError(
            f"{args.crt} expired on {ended:%Y-%m-%d %H:%M:%S} UTC: a CA does not renew an "
            "expired certificate over mutual TLS; get a new one with a token "
            "(federatls ca certificate)"
        )

    async def go() -> Sequence[x509.Certificate]:
        async with _client(args, identity=(chain, key), deadline=_deadline(args)) as ca:
            roots = TrustBundle.from_ca(await ca.roots_bundle(), ())
            renewed = await completed_chain(ca, (await ca.renew()).chain, roots)
        check_renewed(renewed, old=chain[0], roots=roots, now=datetime.now(UTC))
        return renewed

    renewed = _run(go())
    _write_atomic(
        out,
        certs_to_pem(renewed).encode(),
        private=False,
        force=args.force or out == Path(args.crt),
    )
    print(f"Your certificate has been saved in {out}.")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    serial = args.serial
    if bool(args.cert) != bool(args.key):
        raise UsageError("--cert and --key go together")

    async def go() -> None:
        request_args = {
            "serial": serial,
            "reason_code": args.reason_code,
            "reason": args.reason or "",
        }
        if args.cert and args.key:
            identity = (_read_certs(args.cert, "certificate"), _read_key(args.key))
            async with _client(args, identity=identity) as ca:
                await ca.revoke(RevokeRequest(**request_args))
            return
        token = args.token or await _mint(args, serial, revoke=True)
        async with _client(args) as ca:
            await ca.revoke(RevokeRequest(**request_args, ott=token))

    _run(go())
    print(f"Certificate with serial number {serial} has been revoked.")
    return 0


def _bundle_command(
    fetch: Callable[[CAClient], Coroutine[Any, Any, Sequence[x509.Certificate]]], what: str
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if args.out:
            _check_writable(Path(args.out), force=args.force)

        async def go() -> Sequence[x509.Certificate]:
            async with _client(args) as ca:
                return await fetch(ca)

        certs = _run(go())
        pem = certs_to_pem(certs)
        if args.out:
            _write_atomic(Path(args.out), pem.encode(), private=False, force=args.force)
            print(f"The {what} certificate bundle has been saved in {args.out}.")
        else:
            sys.stdout.write(pem)
        return 0

    return run


def cmd_crl(args: argparse.Namespace) -> int:
    """The CA's CRL (docs/protocol.md, "CRL"), its signature verified with the CA's
    certificates (its /intermediates, or --intermediates) chained to --root before anything
    is written: to --out (atomically) or to standard output."""
    _require_ca(args)
    if args.out:
        _check_writable(Path(args.out), force=args.force)
    extra = _read_certs(args.intermediates, "intermediates") if args.intermediates else None

    async def go() -> tuple[bytes, x509.CertificateRevocationList]:
        async with _client(args, deadline=_deadline(args)) as ca:
            return await ca.crl(pem=args.pem, issuers=extra)

    body, crl = _run(go())
    if args.out:
        _write_atomic(Path(args.out), body, private=False, force=args.force)
        count = f"{len(crl)} revoked certificate{'' if len(crl) == 1 else 's'}"
        print(f"The CRL ({count}) has been saved in {args.out}.")
    else:
        sys.stdout.buffer.write(body)
        sys.stdout.buffer.flush()
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    async def go() -> str:
        async with _client(args) as ca:
            return await ca.health()

    print(_run(go()))
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    """Each federation peer of ca.json, with what the CA's store holds of it."""
    _need_ca_extra("federatls ca peers")
    import json

    from .ca._config import CAConfig
    from .ca._database import open_store
    from .ca._federation import PeerState, peer_status, state_key

    config = CAConfig.load(args.config)
    database = args.db or config.database
    peers = config.federation.peers
    states: dict[str, PeerState | None] = dict.fromkeys((p.name for p in peers), None)
    if peers and not (database.kind == "sqlite" and not Path(database.location).exists()):
        store = open_store(database)
        try:
            for peer in peers:
                raw = store.get_state(state_key(peer.name))
                if raw is not None:
                    states[peer.name] = PeerState.from_bytes(raw, state_key(peer.name))
        finally:
            store.close()
    report = [peer_status(peer, states[peer.name]) for peer in peers]
    if args.json:
        print(json.dumps({"peers": report}, indent=2))
        return 0
    if not report:
        print(f"{args.config} names no federation peers")
    for item in report:
        print(f"{item['name']} ({item['profile']}) {item['url']}")
        print(f"  names: {', '.join(item['names'])}")
        for root in item["roots"] or [None]:
            shown = f"{root['fingerprint']} {root['subject']}" if root else "none yet"
            print(f"  root: {shown}")
        print(f"  last success: {item['lastSuccess'] or 'never'}")
        error = f"{item['lastErrorAt']} {item['lastError']}" if item["lastError"] else "none"
        print(f"  last error: {error}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from .ca import _rotation

    directory = Path(args.dir)
    if args.step == "add-root":
        password = read_password(args.password_file, "Please enter the CA password: ")
        step = _rotation.add_root(directory, password, now=datetime.now(UTC))
    elif args.step == "issue-from-new-root":
        step = _rotation.issue_from_new_root(directory)
    else:
        step = _rotation.retire_old_roots(directory)
    print(step.summary)
    print(
        f"Updated {step.config}: send the CA SIGHUP to apply it, then wait at least one "
        "renewal period of every workload before the next step."
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _need_ca_extra("federatls demo")
    from ._demo import run_demo

    code: int = _run(run_demo(keep=args.keep))
    return code


# The parser --------------------------------------------------------------------------------
def _ca_flags(p: argparse.ArgumentParser, *, root_required: bool = True) -> None:
    p.add_argument(
        "--ca-url",
        type=_https_url,
        metavar="URL",
        help="the CA's URL, e.g. https://127.0.0.1:9000",
    )
    p.add_argument(
        "--root",
        metavar="ROOT.crt",
        help="the CA's root certificate (PEM)"
        + ("" if root_required else "; taken from the token if absent"),
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"seconds for the exchange with the CA, all its calls together "
        f"(default {DEFAULT_TIMEOUT:g}; a password prompt does not count)",
    )


def _token_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provisioner", metavar="NAME", help="the JWK provisioner to sign with")
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="file with the provisioner password (else it is asked)",
    )


# A password in a --db URL is shown to every local user by ps: libpq can read it elsewhere.
_DB_URL_HELP = "the password from ~/.pgpass or PGPASSWORD (one in the URL is shown by ps)"


def _db_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--db",
        type=_database_url,
        metavar="URL",
        help=f"{what}: postgresql://USER@HOST:PORT/NAME; {_DB_URL_HELP}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="federatls", description="Mutual TLS across federated CAs.")
    parser.add_argument("--version", action="version", version=f"federatls {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    top = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ca = top.add_parser("ca", help="run and use step-ca compatible CAs")
    verbs = ca.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    p = verbs.add_parser("init", help="create a PKI (root, intermediate, provisioner, ca.json)")
    p.add_argument("name", type=_name, help="the CA's name, e.g. cloud")
    p.add_argument("--dir", required=True, help="directory to create (must not exist, or be empty)")
    p.add_argument(
        "--address", required=True, type=_address, metavar="HOST:PORT", help="where the CA listens"
    )
    p.add_argument(
        "--dns",
        action="append",
        metavar="NAME",
        help="a DNS name or IP of the CA (repeat); default: the address's host",
    )
    p.add_argument(
        "--password-file", metavar="FILE", help="file with the password that encrypts the CA keys"
    )
    p.add_argument(
        "--provisioner",
        default="admin",
        type=_name,
        metavar="NAME",
        help="name of the JWK provisioner (default: admin)",
    )
    for flag, kind, metavar, what in (
        ("--permit-dns", _permit_dns, "NAME", "DNS names at or below NAME (.NAME: below only)"),
        (
            "--permit-uri-domain",
            _permit_uri_domain,
            "DOMAIN",
            "URIs whose host is DOMAIN, e.g. a SPIFFE trust domain (.DOMAIN: hosts below it)",
        ),
        ("--permit-ip", _permit_ip, "CIDR", "IP addresses in the network CIDR"),
        (
            "--permit-email",
            _permit_email,
            "ADDRESS",
            "email addresses: a mailbox, all at a host, or all below .DOMAIN",
        ),
    ):
        p.add_argument(
            flag,
            action="append",
            type=kind,
            default=[],
            metavar=metavar,
            help=f"the CA may issue {what} (repeat; written as X.509 name constraints in the "
            "intermediate; a name type no --permit flag names stays unconstrained)",
        )
    p.set_defaults(func=cmd_init)

    p = verbs.add_parser("serve", help="run a CA from its ca.json")
    p.add_argument("config", help="path of ca.json")
    p.add_argument(
        "--password-file", metavar="FILE", help="file with the password of the intermediate key"
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="worker processes sharing the port and the database (default 1: this process)",
    )
    _db_flag(p, "the database to serve from, in place of ca.json's db block")
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("db", help="create or migrate the CA's database")
    db_verbs = p.add_subparsers(dest="db_verb", required=True, parser_class=_Parser)
    p = db_verbs.add_parser(
        "init",
        help="create or upgrade the schema (before `ca serve` on PostgreSQL)",
        description="Create the CA's tables in its database, or bring an older schema up to "
        "this federatls's; a database already current is left as it is. `ca serve` never "
        "creates tables in PostgreSQL, so its role needs no CREATE privilege (docs/ca.md "
        "lists the GRANTs it needs). The database itself must exist.",
    )
    p.add_argument("config", help="path of ca.json (its db block names the database)")
    _db_flag(p, "the database to initialise, in place of ca.json's db block")
    p.set_defaults(func=cmd_db_init)
    p = db_verbs.add_parser(
        "migrate",
        help="copy the SQLite state beside ca.json into an empty PostgreSQL database",
        description="Copy the used token ids, certificates and revocations of the SQLite "
        "file beside ca.json (federatls.db) into an empty PostgreSQL database, in one "
        "transaction; the schema is created there if absent. A database that holds any "
        "of them is refused. Stop the CA first, then point ca.json's db block (or --db) "
        "at the target.",
    )
    p.add_argument("config", help="path of ca.json (federatls.db beside it is copied)")
    p.add_argument(
        "--to",
        required=True,
        type=_database_url,
        metavar="URL",
        help=f"the target: postgresql://USER@HOST:PORT/NAME; {_DB_URL_HELP}",
    )
    p.set_defaults(func=cmd_db_migrate)

    p = verbs.add_parser("token", help="print a one-time token, as `step ca token`")
    p.add_argument("subject", help="the certificate's common name (or the serial, --revoke)")
    _ca_flags(p)
    _token_flags(p)
    p.add_argument(
        "--san",
        action="append",
        metavar="NAME",
        help="a subject alternative name (repeat); default: the subject",
    )
    p.add_argument(
        "--not-after",
        dest="token_not_after",
        type=_token_validity,
        metavar="DURATION",
        help="how long the token is valid (10s to 1h; default 5m)",
    )
    p.add_argument("--offline", metavar="CA.JSON", help="mint from a ca.json without a running CA")
    p.add_argument("--revoke", action="store_true", help="a token to revoke serial SUBJECT")
    p.add_argument(
        "--cnf-file",
        metavar="CSR",
        help="bind the token to this certificate request (PEM or DER): the CA signs no other "
        "with it (the cnf claim, step-ca 0.27.3+)",
    )
    p.set_defaults(func=cmd_token)

    p = verbs.add_parser("certificate", help="get a certificate and key, as `step ca certificate`")
    p.add_argument("subject")
    p.add_argument("crt", help="where to write the certificate chain")
    p.add_argument("key", help="where to write the private key (mode 0600)")
    p.add_argument("--token", help="a one-time token (else one is minted with the password)")
    _ca_flags(p, root_required=False)
    _token_flags(p)
    p.add_argument("--san", action="append", metavar="NAME")
    p.add_argument(
        "--not-before",
        type=_time_or_duration,
        metavar="TIME|DURATION",
        help="certificate validity start",
    )
    p.add_argument(
        "--not-after",
        type=_time_or_duration,
        metavar="TIME|DURATION",
        help="certificate validity end",
    )
    p.add_argument(
        "--kty",
        type=_key_type,
        default=KeyType.P256,
        help=", ".join(k.value + (" (default)" if k is KeyType.P256 else "") for k in KeyType),
    )
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_certificate)

    p = verbs.add_parser("renew", help="renew a certificate over mTLS")
    p.add_argument("crt")
    p.add_argument("key")
    _ca_flags(p)
    p.add_argument("--out", help="write the renewed chain here instead of over CRT")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=cmd_renew)

    p = verbs.add_parser("revoke", help="revoke a certificate (by token or over mTLS)")
    p.add_argument(
        "serial", type=_decimal_serial, help="the serial number: decimal, or hex with 0x"
    )
    _ca_flags(p)
    _token_flags(p)
    p.add_argument("--token", help="a revoke token (else one is minted with the password)")
    p.add_argument("--cert", help="revoke over mTLS with this certificate...")
    p.add_argument("--key", help="...and this key")
    p.add_argument("--reason-code", type=int, default=0, help="RFC 5280 reason code 0-10")
    p.add_argument("--reason", help="free-text reason")
    p.set_defaults(func=cmd_revoke)

    for verb, fetch, what in (
        ("roots", CAClient.roots_bundle, "root"),
        ("federation", CAClient.federation, "federation"),
    ):
        p = verbs.add_parser(verb, help=f"save the CA's {what} bundle (PEM)")
        p.add_argument("out", nargs="?", help="file to write (default: standard output)")
        _ca_flags(p)
        p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
        p.set_defaults(func=_bundle_command(fetch, what))

    p = verbs.add_parser(
        "crl",
        help="save the CA's certificate revocation list, its signature verified",
        description="Fetch the CA's CRL (step-ca 0.23+ with a crl block in ca.json), verify "
        "its signature with the CA's intermediate (from the CA's /intermediates, or "
        "--intermediates) chained to --root, then write it: DER, or PEM with --pem.",
    )
    _ca_flags(p)
    p.add_argument("--pem", action="store_true", help="PEM instead of DER")
    p.add_argument("--out", metavar="FILE", help="file to write (default: standard output)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument(
        "--intermediates",
        metavar="FILE",
        help="the CA's intermediate certificates (PEM), for a CA without /intermediates",
    )
    p.set_defaults(func=cmd_crl)

    p = verbs.add_parser("rotate", help="rotate the CA's root, one step at a time")
    p.add_argument("dir", help="the CA directory made by `federatls ca init`")
    p.add_argument(
        "step",
        choices=["add-root", "issue-from-new-root", "retire-old-roots"],
        help="add-root: trust a new root too; issue-from-new-root: issue from it; "
        "retire-old-roots: trust only it",
    )
    p.add_argument("--password-file", metavar="FILE", help="the CA password (for add-root)")
    p.set_defaults(func=cmd_rotate)

    p = verbs.add_parser(
        "peers",
        help="show the federation peers a CA follows: roots, last success, last error",
        description="For each peer of ca.json's federation block: its URL, the roots the CA "
        "trusts for it now (fingerprint and subject), its last successful fetch and its "
        "last error, as the CA's store holds them (shared by its worker processes and "
        "replicas).",
    )
    p.add_argument("config", help="path of ca.json")
    _db_flag(p, "the database to read, in place of ca.json's db block")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_peers)

    p = verbs.add_parser("health", help="ask the CA whether it is healthy")
    _ca_flags(p)
    p.set_defaults(func=cmd_health)

    p = top.add_parser(
        "demo",
        help="run the federation tutorial with two local CAs",
        description="The step-ca federation tutorial, run for real on this machine: two CAs "
        "(cloud and kubernetes), a server refused a client of the other CA, federation by "
        "SIGHUP, mutual TLS across the two, live renewal, then the CAs following each "
        "other by URL while one rotates its root under live calls. Every command it runs is "
        "printed. Everything lives in a temporary directory, removed when the demo ends "
        "(also on Ctrl-C, Ctrl-\\, SIGTERM or SIGHUP). Needs curl and the 'ca' extra.",
    )
    p.add_argument(
        "--keep", action="store_true", help="leave the CAs and the server running until Ctrl-C"
    )
    p.set_defaults(func=cmd_demo)
    for sub in (*top.choices.values(), *verbs.choices.values(), *db_verbs.choices.values()):
        sub.set_defaults(parser=sub)  # a UsageError is reported by the verb's own parser
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "ca" and args.verb == "serve" and not args.verbose:
        logging.getLogger("federatls").setLevel(logging.INFO)
    try:
        code: int = args.func(args)
    except UsageError as exc:
        args.parser.error(str(exc))
    except FederatlsError as exc:
        print(f"federatls: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file system failure not translated where it happened
        where = f": {exc.filename}" if exc.filename else ""
        print(f"federatls: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("federatls: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
