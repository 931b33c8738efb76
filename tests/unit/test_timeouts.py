"""The timer wheel behind idle and lifetime deadlines (pure logic), and the kernel
behaviour the accept path relies on."""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st

from echod.server.timeouts import TimeoutWheel


def test_items_fire_at_their_deadline_rounded_up_to_the_resolution() -> None:
    wheel: TimeoutWheel[str] = TimeoutWheel(0.5)
    wheel.add(1, "a", 10.2)
    wheel.add(2, "b", 10.5)
    wheel.add(3, "c", 11.9)
    assert wheel.next_deadline() == 10.5
    assert wheel.pop_due(10.4) == []
    assert sorted(wheel.pop_due(10.5)) == ["a", "b"]
    assert len(wheel) == 1 and wheel.next_deadline() == 12.0
    assert wheel.pop_due(12.0) == ["c"]
    assert len(wheel) == 0 and wheel.next_deadline() is None


def test_discarded_items_never_fire_and_are_not_kept() -> None:
    wheel: TimeoutWheel[str] = TimeoutWheel(1.0)
    for key in range(1000):  # connection churn: added and closed long before the deadline
        wheel.add(key, f"conn {key}", 300.0)
        wheel.discard(key)
    wheel.discard(5)  # twice is harmless
    assert len(wheel) == 0
    assert wheel.pop_due(1000.0) == []


def test_a_wheel_emptied_by_discards_sets_no_deadline() -> None:
    # The PROXY worker's header wheel: every header arrives in time, so each entry
    # is discarded and only emptied slots remain. Their time once passed, a deadline
    # from them made the worker's housekeeping due forever: a busy loop.
    wheel: TimeoutWheel[str] = TimeoutWheel(1.0)
    wheel.add(1, "conn", 3.0)
    wheel.discard(1)
    assert wheel.next_deadline() is None
    wheel.add(2, "conn", 9.0)  # a stale slot ahead of it fires once, harmlessly
    assert wheel.next_deadline() == 3.0
    assert wheel.pop_due(3.0) == [] and wheel.next_deadline() == 9.0


def test_adding_again_under_a_key_moves_the_item() -> None:
    wheel: TimeoutWheel[str] = TimeoutWheel(1.0)
    wheel.add(7, "conn", 5.0)
    wheel.add(7, "conn", 9.0)  # it was active: re-filed at its new deadline
    assert wheel.pop_due(8.0) == []
    assert wheel.pop_due(9.0) == ["conn"]


@given(
    st.lists(st.tuples(st.integers(0, 50), st.floats(0, 1000)), max_size=200), st.floats(0, 1000)
)
def test_pop_due_returns_exactly_the_live_items_whose_deadline_passed(
    entries: list[tuple[int, float]], now: float
) -> None:
    wheel: TimeoutWheel[int] = TimeoutWheel.for_timeout(30.0)
    latest: dict[int, float] = {}
    for key, deadline in entries:
        wheel.add(key, key, deadline)
        latest[key] = deadline
    due = wheel.pop_due(now)
    assert len(due) == len(set(due))
    # never early; late by less than one slot
    assert all(latest[key] <= now for key in due)
    assert all(latest[key] > now - wheel.resolution for key in latest if key not in due)
    assert len(wheel) == len(latest) - len(due)


def test_accepted_sockets_inherit_tcp_nodelay_from_the_listener() -> None:
    # The worker sets TCP_NODELAY once on each listener instead of once per connection.
    with socket.socket() as listener:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname(), timeout=5):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
