"""The follower's own rules, driven through its fetcher seam (``Follower(fetchers=...)``) over
a real SQLite store: which roots each fetch is authenticated by (those trusted now, or none
at first contact, also after a change of pin), an older SPIFFE bundle refused, the roots still
served while the store cannot be written, another process's fetch under way waited for, a
peer's words escaped, and a stored state read back (``PeerState``).
Fetching from real peers is tests/test_federation_peers.py's."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from federatls._errors import BadMaterialError, PeerFetchError
from federatls.ca import SQLiteStore
from federatls.ca._federation import (
    FederationConfig,
    Fetched,
    Fetcher,
    PeerConfig,
    PeerRoots,
    PeerState,
    pin_of,
    state_key,
)
from federatls.ca._follower import MAX_PEER_ROOTS_BYTES, Follower

from harness import make_pki, wait_until

pytestmark = pytest.mark.anyio

PEER = PeerConfig(
    name="kubernetes",
    profile="step",
    url="https://127.0.0.1:9443",
    names=("*.k8s.internal",),
    refresh=timedelta(seconds=1),
    fingerprint="ab" * 32,
)


def _now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[x509.Certificate, ...]:
    """Three distinct root certificates."""
    base = tmp_path_factory.mktemp("roots")
    return tuple(make_pki(base, name).root for name in ("r1", "r2", "r3"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "federatls.db", busy_timeout=0.2)
    yield opened
    opened.close()


class Script:
    """A fetcher that answers from a list, one answer per fetch (the last repeated), and
    records the roots each fetch was authenticated by."""

    def __init__(self, *answers: Fetched | PeerFetchError) -> None:
        self.answers = list(answers)
        self.trusted: list[tuple[x509.Certificate, ...]] = []

    async def __call__(
        self, peer: PeerConfig, trusted: tuple[x509.Certificate, ...], timeout: float
    ) -> Fetched:
        self.trusted.append(trusted)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, PeerFetchError):
            raise answer
        return answer

    def fetchers(self) -> Callable[[PeerConfig], Fetcher]:
        return lambda peer: self


async def _following(follower: Follower, peer: PeerConfig = PEER) -> None:
    await follower.start(FederationConfig(timedelta(seconds=1), (peer,)))


async def test_later_fetches_are_authenticated_by_the_roots_trusted_now(
    store: SQLiteStore, roots: tuple[x509.Certificate, ...]
) -> None:
    """The first fetch is a first contact (nothing trusted); each later one is given the
    roots the one before brought, so a peer that moves from root 1 to root 2 through a
    bundle of both is followed. Twin: a failed fetch in between changes nothing (the next
    fetch is still authenticated by the last good roots)."""
    r1, r2, _ = roots
    script = Script(
        Fetched((r1,)), Fetched((r1, r2)), PeerFetchError("kubernetes", "down"), Fetched((r2,))
    )
    follower = Follower(store, PeerRoots(), _now, fetchers=script.fetchers())
    await _following(follower)
    try:
        await wait_until(lambda: len(script.trusted) >= 5, 15)
    finally:
        await follower.stop()
    assert script.trusted[:5] == [(), (r1,), (r1, r2), (r1, r2), (r2,)]
    assert follower.roots.get("kubernetes") == (r2,)


async def test_a_changed_pin_starts_from_first_contact(
    store: SQLiteStore, roots: tuple[x509.Certificate, ...]
) -> None:
    """Roots stored under another fingerprint are not served, and the next fetch trusts
    nothing (a first contact under the new pin). Twin: under the same pin, the stored
    roots are served at start and authenticate the first fetch."""
    r1, r2, _ = roots
    stored = PeerState(roots=(r1,), last_success=_now(), checked_at=_now() - timedelta(hours=1),
                       url=PEER.url, pin=pin_of(PEER))  # fmt: skip
    store.put_state(state_key("kubernetes"), stored.to_bytes())
    for peer, served, first in (
        (PEER, (r1,), (r1,)),
        (PeerConfig(**{**PEER.__dict__, "fingerprint": "cd" * 32}), (), ()),
    ):
        script = Script(Fetched((r2,)))
        follower = Follower(store, PeerRoots(), _now, fetchers=script.fetchers())
        await _following(follower, peer)
        try:
            assert follower.roots.get("kubernetes") == served  # before any fetch
            await wait_until(lambda: bool(script.trusted), 10)  # noqa: B023
        finally:
            await follower.stop()
        assert script.trusted[0] == first
        store.put_state(state_key("kubernetes"), stored.to_bytes())


async def test_an_older_spiffe_bundle_is_refused(
    store: SQLiteStore, roots: tuple[x509.Certificate, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """A bundle whose sequence is lower than the last accepted one is refused as old (the
    roots stay, the reason is logged and stored). Twin: a higher sequence is taken."""
    r1, r2, r3 = roots
    script = Script(Fetched((r1,), sequence=5), Fetched((r2,), sequence=3), Fetched((r3,), 6))
    follower = Follower(store, PeerRoots(), _now, fetchers=script.fetchers())
    await _following(follower)
    try:
        await wait_until(lambda: len(script.trusted) >= 2, 10)
        await wait_until(lambda: follower.roots.get("kubernetes") == (r3,), 10)
    finally:
        await follower.stop()
    assert any("sequence 3 is lower than 5" in r.getMessage() for r in caplog.records)
    raw = store.get_state(state_key("kubernetes"))
    assert raw is not None
    state = PeerState.from_bytes(raw, "state")
    assert (state.roots, state.sequence, state.last_error) == ((r3,), 6, "")


async def test_roots_are_served_while_the_store_cannot_be_written(
    store: SQLiteStore, roots: tuple[x509.Certificate, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """While another process holds the database's write lock, a fetch's roots are served
    all the same and the failure to save them is logged once; once the lock is released the
    next fetch is saved, and that logged. Twin: the stored state before and after."""
    caplog.set_level(logging.INFO, logger="federatls.ca")
    r1, _, _ = roots
    locker = sqlite3.connect(store.path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    follower = Follower(store, PeerRoots(), _now, fetchers=Script(Fetched((r1,))).fetchers())
    await _following(follower)
    try:
        await wait_until(lambda: follower.roots.get("kubernetes") == (r1,), 10)
        await asyncio.sleep(1.5)
        assert store.get_state(state_key("kubernetes")) is None
        locker.execute("ROLLBACK")
        await wait_until(lambda: store.get_state(state_key("kubernetes")) is not None, 10)
    finally:
        locker.close()
        await follower.stop()
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "cannot save the state" in m]) == 1, lines
    assert any("states are saved again" in m for m in lines), lines


# The stored state ------------------------------------------------------------------------------
@given(
    sequence=st.none() | st.integers(min_value=0, max_value=2**53),
    error=st.text(max_size=200),
    hint=st.none() | st.integers(min_value=1, max_value=10**6),
    seconds=st.integers(min_value=0, max_value=10**9),
)
def test_a_state_round_trips(
    roots: tuple[x509.Certificate, ...], sequence: int | None, error: str, hint: int | None,
    seconds: int,
) -> None:  # fmt: skip
    """A stored state reads back as it was written, whatever its fields hold."""
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    state = PeerState(
        roots=roots[:2], last_success=when, last_error=error, last_error_at=when,
        checked_at=when, sequence=sequence,
        refresh_hint=None if hint is None else timedelta(seconds=hint),
        url=PEER.url, pin=pin_of(PEER),
    )  # fmt: skip
    assert PeerState.from_bytes(state.to_bytes(), "state") == state


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_an_unreadable_state_is_one_bad_material_error(raw: bytes) -> None:
    """Twin: bytes that are not a state written by ``to_bytes`` are a ``BadMaterialError``
    naming the key, or read as a state; never another exception."""
    try:
        PeerState.from_bytes(raw, "peer:x")
    except BadMaterialError as exc:
        message = str(exc)
    else:
        return
    assert message.startswith("peer:x: the stored state is unreadable")


async def test_a_peers_words_are_escaped_and_clipped(
    store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    """An error carrying the peer's own text (its error message) is logged and stored on one
    line, control characters escaped, clipped to 500 characters: a peer cannot forge log
    lines or flood the store. Twin: a plain reason is kept as it is."""
    forged = "refused\nWARNING federatls.ca: forged\x1b[2J" + "x" * 5000
    for name, reason in (("forged", forged), ("plain", "connection refused")):
        peer = PeerConfig(**{**PEER.__dict__, "name": name})
        script = Script(PeerFetchError(name, reason))
        follower = Follower(store, PeerRoots(), _now, fetchers=script.fetchers())
        await _following(follower, peer)
        try:
            await wait_until(lambda: store.get_state(state_key(name)) is not None, 10)  # noqa: B023
        finally:
            await follower.stop()
    lines = {
        name: [r.getMessage() for r in caplog.records if f"peer {name!r}" in r.getMessage()]
        for name in ("forged", "plain")
    }
    stored = {}
    for name in lines:
        raw = store.get_state(state_key(name))
        assert raw is not None
        stored[name] = PeerState.from_bytes(raw, "state").last_error
    (line,) = lines["forged"]
    assert "\n" not in line
    assert "\x1b" not in line
    assert "refused\\nWARNING federatls.ca: forged\\x1b[2J" in line
    assert len(stored["forged"]) == 501
    assert stored["forged"].endswith("…")
    assert stored["plain"] == "connection refused"
    assert "connection refused; keeping" in lines["plain"][0]


async def test_a_fetch_claimed_by_another_process_is_waited_for(
    store: SQLiteStore, roots: tuple[x509.Certificate, ...]
) -> None:
    """A stored claim of a fetch under way (another worker or replica) is waited for: no
    fetch is made, and that process's result, once stored, is served. Twin: a claim older
    than a fetch's deadline (its claimant died) is ignored and the peer fetched at once."""
    r1, r2, r3 = roots
    now = _now()
    earlier = now - timedelta(seconds=2)
    base = PeerState(
        roots=(r1,), last_success=earlier, checked_at=earlier, url=PEER.url, pin=pin_of(PEER)
    )
    store.put_state(state_key("kubernetes"), replace(base, claimed_at=now).to_bytes())
    script = Script(Fetched((r2,)))
    follower = Follower(store, PeerRoots(), _now, fetchers=script.fetchers())
    await _following(follower)
    try:
        await asyncio.sleep(1.5)
        assert script.trusted == []
        assert follower.roots.get("kubernetes") == (r1,)
        done = replace(base, roots=(r3,), checked_at=_now(), last_success=_now())
        store.put_state(state_key("kubernetes"), done.to_bytes())
        await wait_until(lambda: follower.roots.get("kubernetes") == (r3,), 10)
        assert script.trusted == []
    finally:
        await follower.stop()

    stale = replace(base, claimed_at=_now() - timedelta(seconds=10))
    store.put_state(state_key("kubernetes"), stale.to_bytes())
    script = Script(Fetched((r2,)))
    follower = Follower(store, PeerRoots(), _now, fetchers=script.fetchers())
    await _following(follower)
    try:
        await wait_until(lambda: follower.roots.get("kubernetes") == (r2,), 10)
        assert script.trusted[0] == (r1,)
    finally:
        await follower.stop()


def _bulky_root() -> x509.Certificate:
    """A self-signed CA certificate padded past ``MAX_PEER_ROOTS_BYTES`` by an extension."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bulky root")])
    now = _now()
    padding = x509.UnrecognizedExtension(
        x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"),
        b"\x04\x83" + (70_000).to_bytes(3) + b"x" * 70_000,
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(padding, critical=False)
        .sign(key, hashes.SHA256())
    )


async def test_a_peer_whose_roots_would_fill_the_federation_answer_is_refused(
    store: SQLiteStore, roots: tuple[x509.Certificate, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """A peer answering roots of more than ``MAX_PEER_ROOTS_BYTES`` (which the CA would serve
    again in ``/federation``, past what its workloads read) is refused: its last good roots
    stay and authenticate the next fetch. Twin: roots of a usual size are taken."""
    r1, r2, _ = roots
    script = Script(Fetched((r1,)), Fetched((r1, _bulky_root())), Fetched((r2,)))
    follower = Follower(store, PeerRoots(), _now, fetchers=script.fetchers())
    await _following(follower)
    try:
        await wait_until(lambda: follower.roots.get("kubernetes") == (r2,), 15)
    finally:
        await follower.stop()
    assert script.trusted[:3] == [(), (r1,), (r1,)]
    assert any(f"more than {MAX_PEER_ROOTS_BYTES}" in r.getMessage() for r in caplog.records)


async def test_a_replicas_clock_ahead_holds_no_fetch_up(
    store: SQLiteStore, roots: tuple[x509.Certificate, ...]
) -> None:
    """A check and a claim stamped an hour ahead (a replica whose clock runs fast) delay this
    process's fetch by one interval at most, not an hour. Twin: a claim stamped now (a fetch
    under way elsewhere) is waited for."""
    r1, r2, _ = roots
    ahead = _now() + timedelta(hours=1)
    skewed = PeerState(roots=(r1,), last_success=ahead, checked_at=ahead, claimed_at=ahead,
                       url=PEER.url, pin=pin_of(PEER))  # fmt: skip
    live = replace(skewed, checked_at=_now() - timedelta(seconds=2), claimed_at=_now())
    for stored, fetched in ((skewed, True), (live, False)):
        store.put_state(state_key("kubernetes"), stored.to_bytes())
        script = Script(Fetched((r2,)))
        follower = Follower(store, PeerRoots(), _now, fetchers=script.fetchers())
        await _following(follower)
        try:
            if fetched:
                await wait_until(lambda: follower.roots.get("kubernetes") == (r2,), 10)  # noqa: B023
            else:
                await asyncio.sleep(1.5)
        finally:
            await follower.stop()
        assert bool(script.trusted) is fetched
        assert follower.roots.get("kubernetes") == ((r2,) if fetched else (r1,))
