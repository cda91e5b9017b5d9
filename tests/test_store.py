"""The ledger's group-commit insert, on a real SQLite file."""

from __future__ import annotations

from pathlib import Path

from evomsgd import clock
from evomsgd.ledger.records import NewMessage
from evomsgd.ledger.store import Store


def _new(n: int, key: str | None = None, request_hash: str | None = None) -> NewMessage:
    now = clock.now()
    return NewMessage(
        id=f"m{n}",
        instance="shop",
        phone="5215512345678",
        phone_input="+5215512345678",
        text=f"text {n}",
        priority=0,
        created_at=now,
        send_at=None,
        expires_at=now + 3600,
        sandbox=True,
        idempotency_key=key,
        request_hash=request_hash,
    )


def test_a_mixed_batch_keeps_arrival_order_and_sees_its_own_keys(tmp_path: Path) -> None:
    store = Store(tmp_path)
    batch = [
        _new(1),
        _new(2, key="k", request_hash="h"),
        _new(3),
        _new(4, key="k", request_hash="h"),  # the same request again, in the same commit
        _new(5, key="k", request_hash="other"),  # the same key, another body
        _new(6),
    ]
    results = store.insert_messages(batch)
    assert [(r.outcome, r.message_id) for r in results] == [
        ("created", "m1"),
        ("created", "m2"),
        ("created", "m3"),
        ("replayed", "m2"),
        ("conflict", "m2"),
        ("created", "m6"),
    ]
    conn = store._reader()
    ids = [row[0] for row in conn.execute("SELECT id FROM messages ORDER BY seq")]
    assert ids == ["m1", "m2", "m3", "m6"]  # FIFO on the lane follows arrival within a batch
    texts = dict(conn.execute("SELECT id, text FROM messages").fetchall())
    assert texts == {"m1": "text 1", "m2": "text 2", "m3": "text 3", "m6": "text 6"}
