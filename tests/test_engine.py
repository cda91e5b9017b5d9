"""The delivery engine against the fake: a send waiting on the network holds no worker thread,
and EVOMSGD_MAX_IN_FLIGHT bounds how many are in flight at once."""

from __future__ import annotations

from tests.conftest import MakeClient, fast_settings, post, wait_status
from tests.fake_evolution import FakeEvolution, Fault


async def test_sends_in_flight_are_bounded_by_the_setting_not_by_the_threads(
    make_client: MakeClient, fake: FakeEvolution
) -> None:
    client = await make_client(
        fast_settings(evolution_url=fake.url, workers=1, max_in_flight=5, evolution_timeout=30)
    )
    fake.script([Fault.HANG] * 10)  # every send waits until released
    ids = [(await post(client, phone=f"+55119000000{i:02d}"))["task_id"] for i in range(10)]
    # One worker thread, yet five sends wait at Evolution at once: none holds the thread.
    await fake.wait_for_arrivals(5, timeout=10)
    health = await (await client.get("/health")).json()
    assert health["counts"]["STARTED"] == 5
    assert (health["instances"][0]["in_flight"], health["counts"]["PENDING"]) == (5, 5)
    fake.release()
    await fake.wait_for_arrivals(10, timeout=10)
    fake.release()
    for task_id in ids:
        assert (await wait_status(client, task_id))["status"] == "SUCCESS"
    assert fake.most_sends_in_progress == 5  # never more than the bound
    assert len(fake.received) == 10
