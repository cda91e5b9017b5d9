"""The ledger's rules on real SQLite files: leases, guarded finishes, recovery, expiry,
idempotency, operators' transitions and the read-only view. Every time is an explicit `now`."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from evomsgd import clock
from evomsgd.errors import StoreUnavailable
from evomsgd.ledger import retention
from evomsgd.ledger.deliveries import IN_WAITING
from evomsgd.ledger.records import Event, InsertResult, Message, NewMessage, Retention, Transition
from evomsgd.ledger.schema import MIGRATIONS
from evomsgd.ledger.store import LEDGER_FILE, Store
from evomsgd.models import Status

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
LEASE = 30.0
SENT = Transition(
    Status.SUCCESS, "sent", None, http_status=201, evolution_key="KEY-B", remote_jid="jid-b"
)


def at(offset: float) -> str:
    """The ledger's text for T0 + offset seconds."""
    return clock.to_db(T0 + offset)


def new(
    message_id: str,
    offset: float = 0.0,
    *,
    expires_in: float = 3600.0,
    key: str | None = None,
    body: str | None = None,
    instance: str = "shop",
    sandbox: bool = False,
) -> NewMessage:
    return NewMessage(
        id=message_id,
        instance=instance,
        phone="5215512345678",
        phone_input="+52 1 55 1234 5678",
        text=f"text of {message_id}",
        priority=0,
        created_at=T0 + offset,
        send_at=None,
        expires_at=T0 + offset + expires_in,
        sandbox=sandbox,
        idempotency_key=key,
        request_hash=body,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    ledger = Store(tmp_path)
    yield ledger
    ledger.close()


def row(store: Store, message_id: str) -> Message:
    msg = store.get(message_id)
    assert msg is not None, message_id
    return msg


def columns(msg: Message | None, **expected: object) -> None:
    """Assert the named columns of a row, each value next to its name."""
    assert msg is not None
    assert {name: getattr(msg, name) for name in expected} == expected


def events(store: Store, message_id: str) -> list[tuple[str, str, str | None]]:
    return [(e.at, e.event, e.detail) for e in store.history(message_id)]


def claimed(store: Store, message_id: str, offset: float) -> Message:
    msg = store.claim(message_id, T0 + offset, LEASE)
    assert msg is not None, f"{message_id} could not be claimed at T0+{offset}"
    return msg


# -- claim and its lease -----------------------------------------------------------------------


def test_claim_takes_a_waiting_message_under_a_lease(store: Store) -> None:
    store.insert_messages([new("m1")])
    msg = claimed(store, "m1", 5)
    columns(
        msg,
        status=Status.STARTED,
        attempts=1,
        started_at=at(5),
        lease_until=at(5 + LEASE),
        next_attempt_at=None,
    )
    assert row(store, "m1") == msg


def test_a_second_claim_of_the_same_message_fails_and_changes_nothing(store: Store) -> None:
    store.insert_messages([new("m1")])
    first = claimed(store, "m1", 5)
    assert store.claim("m1", T0 + 6, LEASE) is None
    assert row(store, "m1") == first  # attempts, started_at and lease are the first claim's


def test_no_claim_of_a_canceled_final_expired_or_unknown_message(store: Store) -> None:
    store.insert_messages([new("canceled"), new("sent"), new("old", expires_in=10)])
    assert store.cancel("canceled", T0 + 1)[0] is True
    assert store.finish_attempt(claimed(store, "sent", 1), T0 + 1, T0 + 2, SENT) is True
    assert store.claim("canceled", T0 + 3, LEASE) is None
    assert store.claim("sent", T0 + 3, LEASE) is None
    assert store.claim("old", T0 + 10, LEASE) is None  # expires_at is not after now
    assert store.claim("nobody", T0 + 3, LEASE) is None
    assert [row(store, i).status for i in ("canceled", "sent", "old")] == [
        Status.CANCELED,
        Status.SUCCESS,
        Status.PENDING,
    ]
    assert row(store, "sent").attempts == 1


# -- finish_attempt, guarded by started_at ----------------------------------------------------


def test_a_worker_whose_lease_was_taken_over_cannot_write_its_outcome(store: Store) -> None:
    store.insert_messages([new("m1")])
    stale = claimed(store, "m1", 0)  # worker A hangs past its lease
    assert store.recover(T0 + 31, only_expired_leases=True) == [("m1", "shop")]
    newer = claimed(store, "m1", 32)  # worker B sends it again
    failed = Transition(Status.FAILURE, "permanent", "A's late answer", error_kind="permanent")

    # A's answer arrives while B still sends, then after B finished: neither may count.
    assert store.finish_attempt(stale, T0 + 0, T0 + 33, failed) is False
    assert row(store, "m1").started_at == at(32)
    assert store.finish_attempt(newer, T0 + 32, T0 + 34, SENT) is True
    assert store.finish_attempt(stale, T0 + 0, T0 + 35, failed) is False

    columns(
        row(store, "m1"),
        status=Status.SUCCESS,
        finished_at=at(34),
        evolution_key="KEY-B",
        remote_jid="jid-b",
        attempts=2,
        error_kind="ambiguous",  # B's success keeps what the recovery recorded
    )
    assert store.history("m1") == [
        Event(
            at(31),
            "recovered",
            None,
            None,
            None,
            "lease expired while sending; it may have been delivered",
        ),
        Event(at(32), "attempt", 2, "sent", 201, None),
    ]


def test_a_retry_records_when_to_try_again_and_spends_the_budget(store: Store) -> None:
    store.insert_messages([new("m1")])
    msg = claimed(store, "m1", 0)
    busy = Transition(
        Status.RETRY,
        "transient",
        "Evolution answered 500",
        http_status=500,
        next_attempt_at=T0 + 60,
        spend_retry=True,
        error_kind="transient",
    )
    assert store.finish_attempt(msg, T0, T0 + 1, busy) is True
    columns(
        row(store, "m1"),
        status=Status.RETRY,
        next_attempt_at=at(60),
        lease_until=None,
        finished_at=None,
        retries_used=1,
        last_error="Evolution answered 500",
        error_kind="transient",
    )
    assert store.finish_attempt(msg, T0, T0 + 2, busy) is False  # not STARTED any more


# -- recover -----------------------------------------------------------------------------------


def test_recover_puts_in_flight_messages_back_flagged_and_only_expired_leases_when_asked(
    store: Store,
) -> None:
    store.insert_messages([new("early"), new("late"), new("waiting")])
    claimed(store, "early", 0)  # lease until T0+30
    claimed(store, "late", 20)  # lease until T0+50
    assert store.recover(T0 + 30, only_expired_leases=True) == []  # a lease ends after its time

    assert store.recover(T0 + 40, only_expired_leases=True) == [("early", "shop")]
    columns(
        row(store, "early"),
        status=Status.RETRY,
        lease_until=None,
        next_attempt_at=at(40),
        recovered=1,
        ambiguous=1,
        last_error="lease expired while sending; it may have been delivered",
        error_kind="ambiguous",
    )
    assert row(store, "late").status is Status.STARTED

    # At start-up every STARTED row is an interrupted send, its lease run out or not.
    assert store.recover(T0 + 41, only_expired_leases=False) == [("late", "shop")]
    columns(
        row(store, "late"),
        status=Status.RETRY,
        recovered=1,
        last_error="daemon stopped while sending; it may have been delivered",
    )
    assert events(store, "late") == [
        (at(41), "recovered", "daemon stopped while sending; it may have been delivered")
    ]
    columns(row(store, "waiting"), status=Status.PENDING, recovered=0, ambiguous=0)


# -- expire_due --------------------------------------------------------------------------------


def test_expire_due_ends_waiting_messages_past_their_expiry_only(store: Store) -> None:
    store.insert_messages(
        [
            new("due", expires_in=100),
            new("retried", expires_in=100),
            new("later", expires_in=101),
            new("sending", expires_in=100),
            new("canceled", expires_in=100),
        ]
    )
    retry = Transition(Status.RETRY, "transient", "Evolution answered 500", next_attempt_at=T0 + 50)
    assert store.finish_attempt(claimed(store, "retried", 0), T0, T0 + 1, retry) is True
    claimed(store, "sending", 99)
    store.cancel("canceled", T0 + 2)

    assert sorted(store.expire_due(T0 + 100)) == [("due", "shop"), ("retried", "shop")]
    columns(
        row(store, "due"),
        status=Status.EXPIRED,
        finished_at=at(100),
        next_attempt_at=None,
        error_kind="expired",
        last_error=f"not sent before it expired at {at(100)}",
    )
    assert row(store, "retried").last_error == (
        f"Evolution answered 500 - not sent before it expired at {at(100)}"
    )
    assert events(store, "due") == [(at(100), "expired", "not sent before its expiry")]
    assert [row(store, i).status for i in ("later", "sending", "canceled")] == [
        Status.PENDING,
        Status.STARTED,
        Status.CANCELED,
    ]
    assert store.expire_due(T0 + 100) == []


# -- idempotency -------------------------------------------------------------------------------


def test_an_idempotency_key_replays_conflicts_and_expires_after_its_ttl(store: Store) -> None:
    def send(message_id: str, offset: float, body: str) -> InsertResult:
        (result,) = store.insert_messages(
            [new(message_id, offset, key="tok:order-7", body=body)], idempotency_ttl=60
        )
        return result

    assert send("m1", 0, "h1") == InsertResult("created", "m1", Status.PENDING)
    assert send("m2", 10, "h1") == InsertResult("replayed", "m1", Status.PENDING)
    assert send("m3", 20, "h2") == InsertResult("conflict", "m1", Status.PENDING)
    store.cancel("m1", T0 + 30)
    assert send("m4", 59.999, "h1") == InsertResult("replayed", "m1", Status.CANCELED)
    # The key was written at T0 with a 60 s TTL: at T0+60 it names nothing any more.
    assert send("m5", 60, "h2") == InsertResult("created", "m5", Status.PENDING)
    assert send("m6", 61, "h2") == InsertResult("replayed", "m5", Status.PENDING)
    assert [m.id for m in (store.get(i) for i in ("m1", "m2", "m3", "m4", "m5", "m6")) if m] == [
        "m1",
        "m5",
    ]


# -- operators: cancel and requeue -------------------------------------------------------------


def test_cancel_ends_only_a_waiting_message_once(store: Store) -> None:
    store.insert_messages([new("m1"), new("sending")])
    claimed(store, "sending", 1)

    changed, msg = store.cancel("m1", T0 + 5)
    assert changed is True
    columns(
        msg, status=Status.CANCELED, finished_at=at(5), next_attempt_at=None, error_kind="canceled"
    )
    again, msg_again = store.cancel("m1", T0 + 6)
    assert (again, msg_again) == (False, msg)
    assert events(store, "m1") == [(at(5), "canceled", "canceled by request")]

    changed, sending = store.cancel("sending", T0 + 7)
    assert changed is False and sending is not None and sending.status is Status.STARTED
    assert store.cancel("nobody", T0 + 8) == (False, None)


def test_requeue_sends_a_failed_message_again_and_nothing_else(store: Store) -> None:
    store.insert_messages([new("failed"), new("sent"), new("waiting"), new("erased")])
    spent = Transition(Status.RETRY, "transient", "busy", next_attempt_at=T0 + 10, spend_retry=True)
    gave_up = Transition(Status.FAILURE, "permanent", "no such number", error_kind="permanent")
    assert store.finish_attempt(claimed(store, "failed", 0), T0, T0 + 1, spent) is True
    assert store.finish_attempt(claimed(store, "failed", 10), T0 + 10, T0 + 11, gave_up) is True
    assert store.finish_attempt(claimed(store, "sent", 0), T0, T0 + 1, SENT) is True
    assert store.finish_attempt(claimed(store, "erased", 0), T0, T0 + 1, gave_up) is True
    assert row(store, "failed").retries_used == 1

    changed, msg = store.requeue("failed", T0 + 20, expires_at=T0 + 7200)
    assert changed is True
    columns(
        msg,
        status=Status.PENDING,
        finished_at=None,
        next_attempt_at=at(20),
        retries_used=0,
        expires_at=at(7200),
        attempts=2,
    )
    assert events(store, "failed")[-1] == (at(20), "requeued", "retry requested by an operator")
    # A requeue never shortens the time a message has left.
    store.cancel("failed", T0 + 21)
    columns(store.requeue("failed", T0 + 22, expires_at=T0 + 5)[1], expires_at=at(7200))

    # Once retention erased its text there is nothing left to send.
    retention.purge(store, T0 + 2 * 86_400, Retention(0, 0, erase_text_days=1))
    assert row(store, "erased").text is None
    for message_id, status in (
        ("sent", Status.SUCCESS),
        ("waiting", Status.PENDING),
        ("erased", Status.FAILURE),
    ):
        changed, msg = store.requeue(message_id, T0 + 30, expires_at=T0 + 7200)
        assert (changed, msg.status if msg else None) == (False, status), message_id
    assert store.requeue("nobody", T0 + 30, expires_at=T0 + 7200) == (False, None)


# -- the waiting group in SQL ------------------------------------------------------------------


def test_the_waiting_queries_match_the_partial_indexes_word_for_word(store: Store) -> None:
    # SQLite uses a partial index only for a query whose WHERE contains the index's own term.
    indexes = dict(
        store.query("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
    )
    for name in ("messages_waiting", "messages_expiry"):
        assert indexes[name].endswith(f"WHERE {IN_WAITING}"), (
            f"{name} no longer matches IN_WAITING: models.WAITING changed? a migration must "
            "rebuild the partial indexes"
        )
    plan = store.query(
        f"EXPLAIN QUERY PLAN SELECT id FROM messages WHERE instance = ? AND {IN_WAITING}"
        " AND next_attempt_at <= ? ORDER BY priority DESC, next_attempt_at, seq LIMIT 1",
        ("shop", at(0)),
    )
    assert any("USING INDEX messages_waiting" in step[-1] for step in plan), plan


# -- the read-only view ------------------------------------------------------------------------


def test_the_view_reads_what_the_daemon_writes_while_it_runs(tmp_path: Path) -> None:
    daemon = Store(tmp_path)
    try:
        daemon.insert_messages([new("m1"), new("m2", 1, instance="b-shop", sandbox=True)])
        daemon.finish_attempt(
            claimed(daemon, "m1", 2),
            T0 + 2,
            T0 + 3,
            Transition(Status.RETRY, "transient", "busy", next_attempt_at=T0 + 9),
        )
        daemon.set_paused("idle", True, "holiday", T0)
        view = Store(tmp_path, readonly=True)
        try:
            assert view.unsent_by_instance() == [("b-shop", 1, None), ("shop", 1, "busy")]
            assert view.newest_is_sandbox() is True
            assert sorted(view.known_instances()) == ["b-shop", "idle", "shop"]
            assert view.paused_lanes() == {"idle": "holiday"}
            assert (view.message_count(), view.schema_version()) == (2, MIGRATIONS[-1][0])
            assert view.integrity_problems("integrity_check") == []
            daemon.insert_messages([new("m3", 4)])  # committed by the daemon: seen at once
            assert (view.message_count(), view.newest_is_sandbox()) == (3, False)
        finally:
            view.close()
    finally:
        daemon.close()


def test_the_view_refuses_every_write(tmp_path: Path) -> None:
    Store(tmp_path).close()
    path = tmp_path / LEDGER_FILE
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE schema_migrations SET applied_at = 'then'")
    view = Store(tmp_path, readonly=True)
    refused = (
        f"the ledger {path} is open read-only here - change it through the daemon or a command "
        "that opens it for writing"
    )
    try:
        with pytest.raises(StoreUnavailable) as insert:
            view.insert_messages([new("m1")])
        with pytest.raises(StoreUnavailable) as cancel:
            view.cancel("m1", T0)
        with pytest.raises(StoreUnavailable) as vacuum:
            retention.reclaim(view, full=True)
        assert [str(e.value) for e in (insert, cancel, vacuum)] == [refused] * 3
        # Beneath the refusal SQLite itself will not write through the view either.
        with pytest.raises(StoreUnavailable) as sql:
            view.query("DELETE FROM schema_migrations")
        assert str(sql.value) == f"cannot read {path}: attempt to write a readonly database"
    finally:
        view.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
        assert conn.execute("SELECT DISTINCT applied_at FROM schema_migrations").fetchall() == [
            ("then",)
        ]


def test_the_view_runs_no_migration_and_leaves_the_file_mode_alone(tmp_path: Path) -> None:
    Store(tmp_path).close()
    path = tmp_path / LEDGER_FILE
    newest = MIGRATIONS[-1][0]
    # A ledger of the previous version, readable by the group: as an older daemon left it.
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TABLE tokens")
        conn.execute("DELETE FROM schema_migrations WHERE version = ?", (newest,))
    os.chmod(path, 0o640)
    view = Store(tmp_path, readonly=True)
    try:
        assert view.schema_version() == MIGRATIONS[-2][0]  # numbers are reserved per issue
    finally:
        view.close()
    with closing(sqlite3.connect(path)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "tokens" not in tables
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_the_view_refuses_a_missing_or_foreign_file_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    missing.mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with closing(sqlite3.connect(foreign / LEDGER_FILE)) as conn:
        conn.execute("CREATE TABLE messages (id)")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / LEDGER_FILE).write_bytes(b"not a database at all" * 100)

    reasons = {}
    for data_dir in (missing, foreign, garbage):
        with pytest.raises(StoreUnavailable) as refused:
            Store(data_dir, readonly=True)
        reasons[data_dir.name] = str(refused.value)
    assert reasons == {
        "missing": f"cannot read {missing / LEDGER_FILE}: unable to open database file",
        "foreign": f"cannot read {foreign / LEDGER_FILE}: no such table: schema_migrations",
        "garbage": f"cannot read {garbage / LEDGER_FILE}: file is not a database",
    }
    assert list(missing.iterdir()) == []
