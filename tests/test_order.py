"""One recipient gets its messages in the order they were accepted, one at a time (README,
Guarantees), across retries, outages and restarts; other recipients are not held back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomsgd.models import Status
from tests.conftest import MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution, Fault
from tests.stepper import DOWN, SENT, TRANSIENT, Stepper

ANA, BEA = "5511900000001", "5511900000002"


def test_a_message_waiting_for_its_retry_holds_back_its_recipient_only(tmp_path: Path) -> None:
    s = Stepper(tmp_path, retry_delay=20.0, retry_jitter=0)  # due within Bea's lease (32 s)
    first = s.accept(ANA)
    s.step()
    (job,) = s.take()
    assert s.attempt(job, TRANSIENT).status == Status.RETRY
    second, third = s.accept(ANA), s.accept(ANA)
    other = s.accept(BEA)
    s.step()
    assert [j.message_id for j in s.take()] == [other]  # Ana's next ones wait for her first
    s.now += 21.0  # the retry is due
    s.step()
    (retry,) = s.take()
    assert retry.message_id == first
    s.step()
    assert s.take() == []  # at most one send in flight per recipient
    s.attempt(retry, SENT)
    for expected in (second, third):
        s.step()
        (job,) = s.take()
        assert job.message_id == expected
        s.attempt(job, SENT)
    s.close()


def test_an_outage_keeps_the_order(tmp_path: Path) -> None:
    s = Stepper(tmp_path)
    before = [s.accept(ANA), s.accept(BEA)]
    s.step()
    for job in s.take():
        assert s.attempt(job, DOWN).status == Status.RETRY  # the lane pauses as down
    during = [s.accept(ANA) for _ in range(3)]
    s.step()
    assert s.take() == []  # paused: nothing is sent while Evolution is down
    s.now += 2.0  # the next probe is due; it answers open and the lane resumes
    for _ in range(10):
        s.step()
        for job in s.take():
            s.attempt(job, SENT)
    ana = [m for m in s.started if m in (before[0], *during)]
    assert ana == [before[0], before[0], *during]  # the failed first, again, then the rest
    s.close()


def test_high_priority_is_its_own_class_and_a_future_schedule_holds_nothing(
    tmp_path: Path,
) -> None:
    s = Stepper(tmp_path, retry_delay=60.0, retry_jitter=0)
    s.accept(ANA, send_at=s.now + 3600)  # scheduled for later: does not hold back what is due
    normal = s.accept(ANA)
    s.step()
    (job,) = s.take()
    assert job.message_id == normal
    s.attempt(job, TRANSIENT)
    code = s.accept(ANA, priority=1)
    s.step()
    assert [j.message_id for j in s.take()] == [code]  # a one-time code does not wait
    s.close()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("accept"), st.sampled_from([ANA, BEA, "5511900000003"]), st.booleans()),
        st.tuples(st.just("finish"), st.integers(0, 5), st.sampled_from(["sent", "transient"])),
        st.tuples(st.just("tick"), st.floats(0.0, 2.0), st.just(False)),
    ),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_any_interleaving_keeps_per_recipient_order(tmp_path_factory: Any, ops: list[Any]) -> None:
    s = Stepper(tmp_path_factory.mktemp("order"), retry_delay=1.0, retry_jitter=0, max_retries=50)
    accepted: dict[tuple[str, int], list[str]] = {}
    key_of: dict[str, tuple[str, int]] = {}
    in_flight: list[Any] = []
    final: list[str] = []

    def drive() -> None:
        s.step()
        for job in s.take():
            key = key_of[job.message_id]
            assert all(key_of[j.message_id] != key for j in in_flight), "two sends in flight"
            # Everything accepted earlier for this recipient is already sent.
            earlier = accepted[key][: accepted[key].index(job.message_id)]
            assert set(earlier) <= set(final), (job.message_id, earlier, final)
            in_flight.append(job)

    for op, a, b in ops:
        if op == "accept":
            key = (a, int(b))
            message_id = s.accept(a, priority=int(b))
            accepted.setdefault(key, []).append(message_id)
            key_of[message_id] = key
        elif op == "finish" and in_flight:
            job = in_flight.pop(a % len(in_flight))
            row = s.attempt(job, SENT if b == "sent" else TRANSIENT)
            if row.status == Status.SUCCESS:
                final.append(row.id)
        elif op == "tick":
            s.now += a
        drive()
    # Let everything finish: every message is sent, each recipient's in acceptance order.
    for _ in range(200):
        if not in_flight and len(final) == len(key_of):
            break
        while in_flight:
            final.append(s.attempt(in_flight.pop(0), SENT).id)
        s.now += 1.0
        drive()
    assert sorted(final) == sorted(key_of)
    for ids in accepted.values():
        assert [m for m in final if m in ids] == ids
    s.close()


async def test_order_survives_an_outage_at_the_fake(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(fast_settings(evolution_url=fake.url, retry_delay=0.05))
    # Ana's first message fails transiently; the four after it must not overtake its retry.
    fake.script(number=ANA, responses=[Fault.SERVER_ERROR, Fault.SERVER_ERROR])
    first = (await post(client, phone=f"+{ANA}", message="1"))["task_id"]
    rest = [(await post(client, phone=f"+{ANA}", message=str(i)))["task_id"] for i in (2, 3)]
    await fake.go_down()
    rest += [(await post(client, phone=f"+{ANA}", message=str(i)))["task_id"] for i in (4, 5)]
    await fake.go_up()
    for task_id in [first, *rest]:
        assert (await wait_status(client, task_id, timeout=20))["status"] == "SUCCESS"
    delivered = [r.text for r in fake.received if r.number == ANA and r.delivered]
    assert delivered == ["1", "2", "3", "4", "5"]
