"""Task ids are UUIDv7: valid UUIDs whose order is their creation order."""

from __future__ import annotations

import threading
import uuid

from evomsgd.ids import task_id

T0 = 1_795_000_000.0  # 2026-11-18


def test_a_task_id_is_a_version_7_uuid_carrying_its_creation_millisecond() -> None:
    value = task_id(T0 + 0.123)
    parsed = uuid.UUID(value)
    assert str(parsed) == value  # canonical lower-case 8-4-4-4-12 form, as Celery's ids were
    assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    assert parsed.int >> 80 == int(T0 * 1000) + 123


def test_task_ids_sort_in_creation_order_as_plain_strings() -> None:
    times = [T0, T0 + 0.001, T0 + 0.002, T0 + 1, T0 + 3600, T0 + 86_400 * 400]
    made = [task_id(t) for t in times]
    assert sorted(made) == made
    assert sorted(made, key=uuid.UUID) == made


def test_ids_made_in_the_same_millisecond_differ() -> None:
    assert len({task_id(T0) for _ in range(10_000)}) == 10_000


def test_ids_made_by_several_threads_at_once_differ() -> None:
    """The random bytes come from a shared pool (one getrandom() per ~400 ids) behind a lock."""
    made: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(task_id(T0) for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(out,)) for out in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({i for out in made for i in out}) == 20_000
