"""Several ``federatls ca serve`` processes behind one name on one PostgreSQL database: what
the cluster guarantees (issue 14, point 3) and what each fault does (point 5), measured from
outside with real processes, real TLS on 127.0.0.1 and a real PostgreSQL server.

Every replica runs the same ca.json (its keys, its password) with a role that may read and
write but not create tables; the schema is made once by ``federatls ca db init``. Clients
trust the one root and dial the one name the replicas' server certificates carry.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from federatls._client import client_tls_context
from federatls._errors import CARefusedError
from federatls._keys import PrivateKey, build_csr, new_private_key
from federatls._protocol import RekeyRequest, SignRequest, error_message
from federatls._token import mint_renew_token, renew_audience
from federatls.ca import CAServer
from federatls.ca._store import TOKEN_RETENTION

from harness import PASSWORD, PKI, FakeClock, federatls, make_pki, wait_until
from postgres import PostgresCluster
from replicas import (
    NAME,
    SUBJECT,
    Answer,
    Balancer,
    Cluster,
    Load,
    Replica,
    answer_of,
    chain_of,
    cluster,
    count,
    fresh_tokens,
    recorded_serials,
    sign,
)

pytestmark = pytest.mark.anyio

STORM = 48  # concurrent copies of one token


async def _database(pki: PKI, postgres: PostgresCluster) -> str:
    """A fresh database named in ``pki``'s ca.json ``db`` block (as step-ca writes it), its
    schema made by ``federatls ca db init``; the URL of a role that cannot create tables,
    for the replicas' ``--db``."""
    url = postgres.new_database()
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    source = f"postgresql://{parts.netloc}/"

    def block(data: dict[str, object]) -> None:
        data["db"] = {"type": "postgresql", "dataSource": source, "database": name}

    pki.edit(block)
    run = await federatls("ca", "db", "init", pki.config)
    assert run.code == 0, run
    return postgres.new_role(f"replica_{name}", url)


@pytest.fixture
async def two(tmp_path: Path, postgres: PostgresCluster) -> AsyncIterator[Cluster]:
    """Two replicas of one CA on one PostgreSQL database."""
    pki = make_pki(tmp_path, "cloud")
    url = await _database(pki, postgres)
    async with cluster(pki, 2, db=url) as made:
        yield made


@pytest.fixture
async def three(tmp_path: Path, postgres: PostgresCluster) -> AsyncIterator[Cluster]:
    """Three replicas of one CA on one PostgreSQL database."""
    pki = make_pki(tmp_path, "cloud")
    url = await _database(pki, postgres)
    async with cluster(pki, 3, db=url) as made:
        yield made


Send = Callable[[httpx.AsyncClient, str, str], Awaitable[Answer]]


async def _storm(made: Cluster, tokens: list[str], send: Send = sign) -> list[Answer]:
    """Send every token at once (``send``: a sign by default), spread over the replicas, on
    connections opened beforehand so that the requests arrive together."""
    urls = made.urls()
    async with made.client(connections=len(tokens)) as client:
        warm = await asyncio.gather(
            *(client.get(urls[i % len(urls)] + "/health") for i in range(len(tokens)))
        )
        assert {r.status_code for r in warm} == {200}
        return list(
            await asyncio.gather(
                *(send(client, urls[i % len(urls)], t) for i, t in enumerate(tokens))
            )
        )


def _unauthorized(answers: list[Answer]) -> list[Answer]:
    return [a for a in answers if a.status == 401]


# A token is spent once ------------------------------------------------------------------------
async def test_replay_storm_over_replicas_buys_one_certificate(three: Cluster) -> None:
    """48 concurrent copies of one token spread over three replicas: exactly one 201 and one
    certificate recorded; the 47 others get step-ca's 401 body. Twin:
    test_distinct_tokens_over_replicas_all_buy_certificates."""
    token = three.pki.token(SUBJECT)
    answers = await _storm(three, [token] * STORM)
    assert Counter(a.status for a in answers) == {201: 1, 401: STORM - 1}, answers
    assert all(a.step_body for a in _unauthorized(answers))
    assert {a.url for a in answers} == set(three.urls())
    assert count(three, "certificates") == 1
    assert count(three, "used_tokens") == 1
    assert recorded_serials(three) == {a.serial for a in answers if a.serial is not None}


async def test_distinct_tokens_over_replicas_all_buy_certificates(three: Cluster) -> None:
    """Twin of the replay storm: 48 distinct tokens at once over the same replicas buy 48
    certificates, 48 records, 48 distinct serials."""
    tokens = [three.pki.token(SUBJECT) for _ in range(STORM)]
    answers = await _storm(three, tokens)
    assert Counter(a.status for a in answers) == {201: STORM}, answers
    serials = {a.serial for a in answers}
    assert len(serials) == STORM
    assert count(three, "certificates") == STORM
    assert count(three, "used_tokens") == STORM
    assert recorded_serials(three) == serials


async def _renew_by_token(client: httpx.AsyncClient, url: str, token: str) -> Answer:
    """POST /1.0/renew with a ``Bearer`` renew token (no client certificate)."""
    response = await client.post(url + "/1.0/renew", headers={"Authorization": f"Bearer {token}"})
    return answer_of(url, response)


@pytest.mark.parametrize("tokens", ["copies of one", "distinct"])
async def test_renew_token_storm_over_replicas(three: Cluster, tokens: str) -> None:
    """48 concurrent copies of one renew token (``x5cInsecure``, no mTLS) over three
    replicas buy one renewal, the others get step-ca's 401; twin: 48 distinct renew tokens
    for the same certificate buy 48 renewals."""
    chain, key = await _enroll(three, three[0].url)
    audience = renew_audience(three.pki.url)
    now = datetime.now(UTC)
    one = mint_renew_token(chain, key, audience=audience, now=now)
    batch = [
        one
        if tokens == "copies of one"
        else mint_renew_token(chain, key, audience=audience, now=now)
        for _ in range(STORM)
    ]
    answers = await _storm(three, batch, _renew_by_token)
    won = 1 if tokens == "copies of one" else STORM
    assert Counter(a.status for a in answers) == (
        {201: 1, 401: STORM - 1} if won == 1 else {201: STORM}
    ), answers
    assert all(a.step_body for a in _unauthorized(answers))
    assert count(three, "certificates") == 1 + won
    assert count(three, "used_tokens") == 1 + won


# A revocation holds on every replica at once ---------------------------------------------------
async def _enroll(made: Cluster, url: str) -> tuple[list[x509.Certificate], PrivateKey]:
    """A certificate and its key, signed by the replica at ``url``."""
    key = new_private_key()
    csr = build_csr(key, SUBJECT, [SUBJECT]).public_bytes(serialization.Encoding.PEM).decode()
    async with made.client() as client:
        response = await client.post(
            url + "/1.0/sign", json={"csr": csr, "ott": made.pki.token(SUBJECT)}
        )
    assert response.status_code == 201, response.text
    return chain_of(response), key


def _rekey_body() -> dict[str, str]:
    csr = build_csr(new_private_key(), SUBJECT, [SUBJECT])
    return {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}


def _step_error(response: httpx.Response, status: int) -> bool:
    return response.status_code == status and response.json() == {
        "status": status,
        "message": error_message(status),
    }


async def test_revoked_on_one_replica_is_refused_by_the_other_at_once(two: Cluster) -> None:
    """A certificate revoked through replica A is refused by replica B in the next request:
    renew and rekey over mTLS get step-ca's 401, a second revocation a 400. Twin:
    test_a_certificate_not_revoked_renews_and_rekeys_on_the_other_replica."""
    a, b = two[0].url, two[1].url
    chain, key = await _enroll(two, a)
    serial = str(chain[0].serial_number)
    async with two.client() as client:
        revoked = await client.post(
            a + "/1.0/revoke",
            json={"serial": serial, "ott": two.pki.token(serial, revoke=True), "passive": True},
        )
        assert revoked.status_code == 200, revoked.text
        again = await client.post(
            b + "/1.0/revoke",
            json={"serial": serial, "ott": two.pki.token(serial, revoke=True), "passive": True},
        )
    async with two.client(identity=(chain, key)) as holder:
        renewed = await holder.post(b + "/1.0/renew")
        rekeyed = await holder.post(b + "/1.0/rekey", json=_rekey_body())
        revoked_by_holder = await holder.post(
            b + "/1.0/revoke", json={"serial": serial, "passive": True}
        )
    assert _step_error(renewed, 401), renewed.text
    assert _step_error(rekeyed, 401), rekeyed.text
    for response in (again, revoked_by_holder):
        assert response.status_code == 400, response.text
        assert "is already revoked" in response.json()["message"]
    assert count(two, "revocations") == 1
    assert count(two, "certificates") == 1  # nothing issued after the revocation


async def test_a_certificate_not_revoked_renews_and_rekeys_on_the_other_replica(
    two: Cluster,
) -> None:
    """Twin of the revocation test: a certificate signed by replica A (not revoked) renews
    and rekeys over mTLS on replica B, then is revoked there by its holder."""
    a, b = two[0].url, two[1].url
    chain, key = await _enroll(two, a)
    serial = str(chain[0].serial_number)
    async with two.client(identity=(chain, key)) as holder:
        renewed = await holder.post(b + "/1.0/renew")
        rekeyed = await holder.post(b + "/1.0/rekey", json=_rekey_body())
        revoked = await holder.post(b + "/1.0/revoke", json={"serial": serial, "passive": True})
    assert renewed.status_code == 201, renewed.text
    assert rekeyed.status_code == 201, rekeyed.text
    assert revoked.status_code == 200, revoked.text
    assert count(two, "certificates") == 3
    assert count(two, "revocations") == 1


@pytest.mark.parametrize("tokens", ["one token", "distinct tokens"])
async def test_concurrent_revocations_over_replicas_record_one(three: Cluster, tokens: str) -> None:
    """24 revocations of one certificate at once over three replicas record one revocation
    and answer one 200: the others get step-ca's 401 (copies of one token: a replay) or a
    400 saying it is already revoked (distinct tokens). Twin: each case is the other's (the
    same race refused for its own reason)."""
    chain, _ = await _enroll(three, three[0].url)
    serial = str(chain[0].serial_number)
    one = three.pki.token(serial, revoke=True)
    bodies = [
        {
            "serial": serial,
            "ott": one if tokens == "one token" else three.pki.token(serial, revoke=True),
            "passive": True,
        }
        for _ in range(24)
    ]
    urls = three.urls()
    async with three.client(connections=len(bodies)) as client:
        await asyncio.gather(*(client.get(urls[i % 3] + "/health") for i in range(len(bodies))))
        answers = await asyncio.gather(
            *(client.post(urls[i % 3] + "/1.0/revoke", json=b) for i, b in enumerate(bodies))
        )
    refusal = 401 if tokens == "one token" else 400
    assert Counter(r.status_code for r in answers) == {200: 1, refusal: 23}
    refused = [r.json() for r in answers if r.status_code == refusal]
    if refusal == 401:
        assert all(body == {"status": 401, "message": error_message(401)} for body in refused)
    else:
        assert all("is already revoked" in body["message"] for body in refused)
    assert count(three, "revocations") == 1
    assert count(three, "used_tokens") == 2  # the sign token and one revoke token


# Serials -----------------------------------------------------------------------------------------
async def test_serials_never_collide_across_replicas_under_load(three: Cluster) -> None:
    """150 signs, 16 at a time, over three replicas: 150 certificates with 150 distinct
    serials, every one recorded. Twin: test_the_database_refuses_a_second_record_of_a_serial."""
    load = Load(three, three.urls, concurrency=16)
    await load.run(total=150)
    assert load.statuses() == {201: 150}, load
    serials = load.serials()
    assert len(set(serials)) == 150
    assert recorded_serials(three) == set(serials)
    assert {a.url for a in load.answers} == set(three.urls())


async def test_the_database_refuses_a_second_record_of_a_serial(two: Cluster) -> None:
    """Twin of the serial test: a colliding serial could not pass unseen, the database
    refuses a second certificate record under a serial already recorded."""
    import psycopg

    chain, _ = await _enroll(two, two[0].url)
    assert two.db is not None
    with psycopg.connect(two.db) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO certificates SELECT * FROM certificates WHERE serial = %s",
            (str(chain[0].serial_number),),
        )
    assert count(two, "certificates") == 1


# A rolling restart refuses no fresh token --------------------------------------------------------
async def test_rolling_restart_under_load_refuses_no_fresh_token(two: Cluster) -> None:
    """Each replica in turn stopped (SIGTERM) and started again while the load goes to the
    other: every fresh token is accepted, those issued before the restarted replica
    started included, wherever they arrive. Twin:
    test_sqlite_ca_refuses_a_token_issued_before_its_restart."""
    issued = datetime.now(UTC)  # after the first start, before any restart below
    tokens = fresh_tokens(two.pki, issued=issued)
    draining: set[str] = set()
    load = Load(
        two,
        lambda: [u for u in two.urls() if u not in draining],
        concurrency=4,
        tokens=tokens,
        pause=0.05,
        expect=frozenset({201}),
    )
    async with load.running():
        await load.wait_for(20)
        for i in range(2):
            # A restart in a later second than the tokens' iat (step-ca's rule compares
            # seconds): the rule, if it held, would refuse them.
            await asyncio.sleep(max(0.0, issued.timestamp() + 1.1 - time.time()))
            draining.add(two[i].url)
            await asyncio.sleep(0.5)  # the answers in flight there arrive
            await two.restart(i)
            draining.clear()
            async with two.client() as client:
                direct = [await sign(client, two[i].url, next(tokens)) for _ in range(5)]
            assert [a.status for a in direct] == [201] * 5, direct
            await load.wait_for(10, url=two[i].url)
    assert set(load.statuses()) == {201}, load
    assert two[0].starts == two[1].starts == 2
    assert recorded_serials(two) >= set(load.serials())


async def test_sqlite_ca_refuses_a_token_issued_before_its_restart(tmp_path: Path) -> None:
    """Twin of the rolling restart: on SQLite, where step-ca's rule holds, a token issued
    before the CA's restart is refused by the restarted CA (401), though never spent."""
    pki = make_pki(tmp_path, "cloud")
    async with cluster(pki, 1) as made:
        token = next(fresh_tokens(pki, issued=datetime.now(UTC) - timedelta(seconds=2)))
        await made.restart(0)
        async with made.client() as client:
            answer = await sign(client, made[0].url, token)
            fresh = await sign(client, made[0].url, pki.token(SUBJECT))
    assert answer.status == 401, answer
    assert answer.step_body, answer
    assert "token issued before the bootstrap of certificate authority" in made[0].log()
    assert fresh.status == 201, fresh
    assert count(made, "used_tokens") == 1  # the refused token was not spent


# Faults ------------------------------------------------------------------------------------------
async def _statuses(made: Cluster, path: str) -> list[tuple[int, object]]:
    async with made.client() as client:
        responses = [await client.get(url + path) for url in made.urls()]
    return [(r.status_code, r.json()) for r in responses]


async def _healthy(made: Cluster, timeout: float = 30.0) -> list[tuple[int, object]]:
    """/health of every replica, once all answer 200 (a replica may keep its last look at
    the database for a moment)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        answers = await _statuses(made, "/health")
        if all(status == 200 for status, _ in answers):
            return answers
        if asyncio.get_running_loop().time() > deadline:
            return answers
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("fault", ["stop", "kill"])
async def test_database_stopped_and_started_under_load(
    two: Cluster, postgres: PostgresCluster, fault: str
) -> None:
    """PostgreSQL stopped under load (a fast shutdown, or SIGKILL and crash recovery): the
    replicas answer 503 with step-ca's body (and 503 on /health) while it is down, keep
    serving /roots, /federation and /root/{sha}, return no certificate whose record is
    missing, and sign again once it is back, without a restart."""
    load = Load(two, two.urls, concurrency=4, pause=0.05, expect=frozenset({201, 503}))
    pids = [r.proc.pid for r in two.replicas if r.proc is not None]
    try:
        async with load.running():
            await load.wait_for(20)
            up = len(load.answers)  # answered before the database was stopped
            await asyncio.to_thread(postgres.stop if fault == "stop" else postgres.kill)
            await load.wait_for(4, 503)
            health_down = await _statuses(two, "/health")
            roots_down = [
                status
                for path in ("/roots", "/federation", f"/root/{two.pki.fingerprint}")
                for status, _ in await _statuses(two, path)
            ]
            await asyncio.to_thread(postgres.start)
            for replica in two.replicas:
                await load.wait_for(10, url=replica.url)
            health_up = await _healthy(two)
    finally:
        await asyncio.to_thread(postgres.start)
    statuses = load.statuses()
    assert set(statuses) == {201, 503}, load
    assert all(a.step_body for a in load.answers if a.status == 503)
    assert all(a.status == 201 for a in load.answers[:up])
    assert recorded_serials(two) >= set(load.serials())  # no certificate without its record
    assert [status for status, _ in health_down] == [503, 503], health_down
    for _, body in health_down:  # says what is wrong, never the password
        assert isinstance(body, dict)
        assert body["status"] == 503
        assert "database" in body["message"]
        assert f"127.0.0.1:{postgres.port}" in body["message"]
        assert urlsplit(two.db or "").password not in body["message"]
    assert roots_down == [201, 201, 201, 201, 200, 200], roots_down
    assert health_up == [(200, {"status": "ok"})] * 2
    assert [r.proc.pid for r in two.replicas if r.proc is not None] == pids
    assert all(r.running and r.starts == 1 for r in two.replicas)


async def test_kill_9_of_a_replica_under_load_loses_no_record(two: Cluster) -> None:
    """One replica killed (SIGKILL) under load: every certificate a client received is
    recorded, the other replica keeps signing, and the killed one serves again when
    started."""
    load = Load(two, two.urls, concurrency=8, pause=0.01, expect=frozenset({201, 0}))
    async with load.running():
        await load.wait_for(30)
        await two.kill(0)
        await load.wait_for(30, url=two[1].url)  # the other replica keeps signing
    assert set(load.statuses()) <= {201, 0}, load
    assert recorded_serials(two) >= set(load.serials())
    assert two[0].proc is not None
    assert two[0].proc.returncode == -signal.SIGKILL
    await two.start(0)
    async with two.client() as client:
        again = await sign(client, two[0].url, two.pki.token(SUBJECT))
    assert again.status == 201, again


# The token table stays bounded -----------------------------------------------------------------
@contextlib.asynccontextmanager
async def _in_process(pki: PKI, clock: FakeClock, count: int) -> AsyncIterator[list[CAServer]]:
    """``count`` replicas of ``pki`` in this process (ca.json's database), all on ``clock``,
    each purging expired token ids every 0.1 s."""
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                CAServer.running(pki.config, PASSWORD, clock=clock, purge_interval=0.1)
            )
            for _ in range(count)
        ]
        pki.url, pki.clock = f"https://{NAME}", clock
        yield servers


async def _purged(servers: list[CAServer]) -> None:
    """Wait until every replica has finished a purge run that started after this call."""
    runs = [s.purge.runs if s.purge is not None else 0 for s in servers]

    def done() -> bool:
        return all(
            s.purge is not None and s.purge.runs >= r + 2
            for s, r in zip(servers, runs, strict=True)
        )

    await wait_until(done, timeout=30)


async def _sign_round(servers: list[CAServer], pki: PKI, tokens: list[str]) -> list[Answer]:
    ctx = client_tls_context([pki.root])
    async with httpx.AsyncClient(verify=ctx, timeout=60) as client:
        return list(
            await asyncio.gather(
                *(sign(client, servers[i % len(servers)].url, t) for i, t in enumerate(tokens))
            )
        )


async def test_purge_keeps_the_token_table_bounded_while_serving(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    """Two replicas sign 5 rounds of 30 tokens; between rounds their clock passes the
    tokens' expiry and the retention: the used-token table never holds more than one round
    while every certificate stays recorded. Twin:
    test_purge_keeps_unexpired_token_ids_and_their_replays_are_refused."""
    pki = make_pki(tmp_path, "cloud")
    url = await _database(pki, postgres)
    clock = FakeClock()
    sizes = []
    async with _in_process(pki, clock, 2) as servers:
        for _ in range(5):
            tokens = [pki.token(SUBJECT) for _ in range(30)]
            answers = await _sign_round(servers, pki, tokens)
            assert [a.status for a in answers] == [201] * 30, answers
            sizes.append(count(url, "used_tokens"))
            clock.advance((TOKEN_RETENTION + timedelta(minutes=6)).total_seconds())
            await _purged(servers)
        sizes.append(count(url, "used_tokens"))
    assert sizes == [30, 30, 30, 30, 30, 0], sizes
    assert count(url, "certificates") == 150


async def test_purge_keeps_unexpired_token_ids_and_their_replays_are_refused(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    """Twin of the bounded table: ids of tokens not past their expiry plus the retention
    survive purge runs on both replicas (a minute short of it included), and a replay of
    such a token on the other replica is refused with step-ca's 401."""
    pki = make_pki(tmp_path, "cloud")
    url = await _database(pki, postgres)
    clock = FakeClock()
    async with _in_process(pki, clock, 2) as servers:
        tokens = [pki.token(SUBJECT) for _ in range(20)]  # valid for 5 minutes
        first = await _sign_round(servers, pki, tokens)
        assert [a.status for a in first] == [201] * 20, first
        await _purged(servers)
        replays = await _sign_round(servers[::-1], pki, tokens)
        assert all(a.status == 401 and a.step_body for a in replays), replays
        clock.advance((TOKEN_RETENTION + timedelta(minutes=4)).total_seconds())
        await _purged(servers)
        kept = count(url, "used_tokens")
    assert kept == 20


# Configuration reaches every replica ---------------------------------------------------------
async def _lifetime(made: Cluster, url: str) -> timedelta:
    chain, _ = await _enroll(made, url)
    return chain[0].not_valid_after_utc - chain[0].not_valid_before_utc


async def _reloaded(replica: Replica, times: int) -> None:
    await wait_until(lambda: replica.log().count("configuration reloaded from") >= times, 30)


async def test_a_configuration_change_reaches_each_replica_at_its_sighup(two: Cluster) -> None:
    """ca.json changed once (the provisioner's default certificate lifetime: 24 h to 1 h):
    each replica signs with the new lifetime from its SIGHUP on, and the replica not yet
    signalled keeps the old one (the twin inside the test)."""
    assert await _lifetime(two, two[0].url) > timedelta(hours=23)
    two.pki.set_claims(defaultTLSCertDuration="1h")
    for i, replica in enumerate(two.replicas):
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGHUP)
        await _reloaded(replica, 1)
        assert await _lifetime(two, replica.url) < timedelta(hours=2)
        for other in two.replicas[i + 1 :]:
            assert await _lifetime(two, other.url) > timedelta(hours=23)


# One name ----------------------------------------------------------------------------------------
def _server_certificate(url: str, root: Path, name: str) -> x509.Certificate:
    """The certificate a replica presents to a client that trusts ``root`` and dials
    ``name`` (hostname checked)."""
    parts = urlsplit(url)
    ctx = ssl.create_default_context(cafile=str(root))
    with (
        socket.create_connection((parts.hostname, parts.port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_every_replica_is_valid_for_the_one_name_with_its_own_certificate(
    two: Cluster,
) -> None:
    """One client configuration (the root, the name 127.0.0.1 or localhost) verifies every
    replica; each presents its own server certificate, for the same names. Twin: a name
    outside ca.json's dnsNames fails verification on every replica."""
    certs = [
        await asyncio.to_thread(_server_certificate, r.url, two.pki.root_path, name)
        for r in two.replicas
        for name in (NAME, "localhost")
    ]
    assert len({c.serial_number for c in certs}) == 2  # one per replica
    sans = {
        tuple(
            sorted(
                map(str, c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
            )
        )
        for c in certs
    }
    assert len(sans) == 1
    for replica in two.replicas:
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            await asyncio.to_thread(
                _server_certificate, replica.url, two.pki.root_path, "elsewhere.internal"
            )


async def test_the_sdk_client_behind_one_address_signs_renews_and_is_refused_a_replay(
    two: Cluster,
) -> None:
    """Behind one address (a TCP balancer passing TLS through to each replica in turn) the
    SDK's CA client signs, renews over mTLS and rekeys, whichever replica each connection
    reaches. Twin: a token spent through one replica is refused (401) through the other."""
    async with Balancer(two) as balancer:
        two.pki.url = balancer.url  # the one address, in the tokens' audience
        token = two.pki.token(SUBJECT)
        key = new_private_key()
        request = SignRequest(build_csr(key, SUBJECT, [SUBJECT]), token)
        async with two.pki.client() as ca:  # one connection: one replica
            signed = await ca.sign(request)
        async with two.pki.client() as ca:  # the next connection: the other replica
            with pytest.raises(CARefusedError) as refused:
                await ca.sign(request)
        identity = (list(signed.chain), key)
        async with two.pki.client(identity) as ca:
            renewed = await ca.renew()
        async with two.pki.client(identity) as ca:
            rekeyed = await ca.rekey(RekeyRequest(build_csr(new_private_key(), SUBJECT, [SUBJECT])))
    assert refused.value.status == 401
    assert set(balancer.served) == set(two.urls())
    assert renewed.leaf.subject == rekeyed.leaf.subject == signed.leaf.subject
    assert recorded_serials(two) == {c.leaf.serial_number for c in (signed, renewed, rekeyed)}
