"""Accepting comes first: while the event loop is busy (the API has new messages in hand, or the
loop runs late), an unpaced lane keeps at most BUSY_IN_FLIGHT sends in flight; the group committer
answers the signals the dispatcher reads."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

from evomsgd import ids
from evomsgd.engine.dispatcher import BUSY_IN_FLIGHT
from evomsgd.ledger.commit import ACCEPT_MEMORY, LATE_AFTER, GroupCommitter
from evomsgd.ledger.records import NewMessage
from evomsgd.ledger.store import Store
from tests.stepper import SENT, T0, Stepper


def test_an_unpaced_lane_keeps_few_sends_in_flight_while_the_loop_is_busy(
    tmp_path: Path,
) -> None:
    busy = [True]
    s = Stepper(tmp_path, busy=lambda: busy[0], send_interval=0, max_in_flight=200)
    for i in range(150):
        s.accept(f"5511{988000000 + i}")
    s.step()
    first = s.take()
    assert len(first) == BUSY_IN_FLIGHT  # not the 150 the in-flight bound would allow
    s.step()
    assert s.take() == []
    s.attempt(first[0], SENT)
    s.step()
    assert len(s.take()) == 1  # one finished, one more: still BUSY_IN_FLIGHT in flight
    busy[0] = False
    s.attempt(first[1], SENT)
    s.step()
    # Idle again: the bound grows back by BUSY_IN_FLIGHT a step, not all at once.
    assert len(s.take()) == BUSY_IN_FLIGHT + 1
    assert s.dispatcher.in_flight() == 2 * BUSY_IN_FLIGHT
    s.close()


def test_a_paced_lane_is_not_held_back_by_a_busy_loop(tmp_path: Path) -> None:
    s = Stepper(tmp_path, busy=lambda: True, send_interval=1.0, send_jitter=0, max_in_flight=200)
    for i in range(BUSY_IN_FLIGHT + 8):
        s.accept("5511988000000", instance=f"i{i:03d}")
    s.step()
    # One send each on every paced lane: their pace, not the busy bound, is what limits them.
    assert len(s.take()) == BUSY_IN_FLIGHT + 8
    s.close()


def _new(n: int) -> NewMessage:
    return NewMessage(
        id=ids.task_id(T0),
        instance="main",
        phone=f"5511{988000000 + n}",
        phone_input="+55",
        text="t",
        priority=0,
        created_at=T0,
        send_at=None,
        expires_at=T0 + 86_400,
        sandbox=True,
    )


async def test_accepting_while_an_accept_waits_and_shortly_after(tmp_path: Path) -> None:
    now = [100.0]
    store = Store(tmp_path, durability="normal")
    committer = GroupCommitter(
        store, asyncio.get_running_loop(), idempotency_ttl=60.0, monotonic=lambda: now[0]
    )
    assert not committer.accepting()
    waiting = asyncio.ensure_future(committer.submit(_new(1)))
    await asyncio.sleep(0)  # submit() runs up to its commit wait (the writer is not started)
    now[0] += 10 * ACCEPT_MEMORY
    assert committer.accepting()  # a message waits for its commit, however long
    committer.start()
    assert (await waiting).outcome == "created"
    assert committer.accepting()  # answered just now: the client's next request is coming
    now[0] += 2 * ACCEPT_MEMORY
    assert not committer.accepting()
    committer.stop()
    store.close()


async def test_the_loop_is_late_when_a_batch_waited_for_it(tmp_path: Path) -> None:
    store = Store(tmp_path, durability="normal")
    loop = asyncio.get_running_loop()
    for step, late in ((LATE_AFTER / 10, False), (LATE_AFTER * 10, True)):
        # Every reading of the clock is `step` after the one before: the writer's when it
        # posts a batch's answers, then the loop's when it runs them.
        ticks = itertools.count(0.0, step)
        committer = GroupCommitter(
            store, loop, idempotency_ttl=60.0, monotonic=lambda ticks=ticks: next(ticks)
        )
        committer.start()
        assert await committer.write_soon(lambda cur: cur.execute("SELECT 1").fetchone()) == (1,)
        assert committer.loop_late() is late
        committer.stop()
    store.close()
