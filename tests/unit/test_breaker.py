"""The circuit breaker state machine, on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.delivery.breaker import Breaker, Breakers


def opened(threshold: int = 3, open_seconds: float = 30, now: float = 0) -> Breaker:
    breaker = Breaker(threshold, open_seconds)
    for _ in range(threshold):
        assert breaker.allow(now)
        breaker.record_failure(now)
    assert breaker.state == "open"
    return breaker


def test_a_new_breaker_is_closed_and_allows() -> None:
    breaker = Breaker(3, 30)
    assert breaker.state == "closed"
    assert breaker.allow(0)


def test_opens_after_threshold_consecutive_failures() -> None:
    breaker = Breaker(3, 30)
    breaker.record_failure(0)
    breaker.record_failure(1)
    assert breaker.state == "closed"
    breaker.record_failure(2)
    assert breaker.state == "open"
    assert not breaker.allow(2)


def test_a_success_resets_the_failure_count() -> None:
    breaker = Breaker(3, 30)
    breaker.record_failure(0)
    breaker.record_failure(0)
    breaker.record_success(0)
    breaker.record_failure(0)
    breaker.record_failure(0)
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 2


def test_open_refuses_until_the_pause_is_over() -> None:
    breaker = opened(open_seconds=30, now=100)
    assert not breaker.allow(129.9)
    assert breaker.state_at(129.9) == "open"
    assert breaker.state_at(130) == "half_open"
    assert breaker.state == "open"  # lazily: nothing asked since
    assert breaker.retry_at() == 130


def test_half_open_lets_exactly_one_trial_through() -> None:
    breaker = opened(open_seconds=30, now=0)
    assert breaker.allow(30)
    assert breaker.state == "half_open"
    assert not breaker.allow(31)
    assert not breaker.allow(1000)


def test_a_successful_trial_closes_the_circuit() -> None:
    breaker = opened(open_seconds=30, now=0)
    assert breaker.allow(30)
    breaker.record_success(30.5)
    assert breaker.state == "closed"
    assert breaker.allow(30.5)
    assert breaker.allow(30.5)
    assert breaker.retry_at() is None


def test_a_failed_trial_opens_the_circuit_for_another_pause() -> None:
    breaker = opened(open_seconds=30, now=0)
    assert breaker.allow(30)
    breaker.record_failure(31)
    assert breaker.state == "open"
    assert not breaker.allow(60)
    assert breaker.allow(61)


def test_a_released_trial_lets_the_next_caller_try() -> None:
    breaker = opened(open_seconds=30, now=0)
    assert breaker.allow(30)
    breaker.release(31)
    assert breaker.state == "half_open"
    assert breaker.allow(31)
    assert not breaker.allow(31)


def test_late_failures_do_not_extend_the_pause() -> None:
    breaker = opened(open_seconds=30, now=0)
    breaker.record_failure(20)  # a request sent before the circuit opened
    assert breaker.allow(30)


def test_a_late_success_closes_the_circuit() -> None:
    breaker = opened(open_seconds=30, now=0)
    breaker.record_success(5)
    assert breaker.state == "closed"
    assert breaker.allow(5)


def test_release_while_closed_changes_nothing() -> None:
    breaker = Breaker(1, 30)
    breaker.release(0)
    assert breaker.state == "closed"


@pytest.mark.parametrize(("threshold", "open_seconds"), [(0, 30), (1, -1)])
def test_nonsense_settings_are_refused(threshold: int, open_seconds: float) -> None:
    with pytest.raises(ValueError):
        Breaker(threshold, open_seconds)
    with pytest.raises(ValueError):
        Breakers(threshold, open_seconds)


def test_breakers_keep_one_breaker_per_destination() -> None:
    breakers = Breakers(1, 30)
    a = breakers.get("https://a.example:443")
    assert a is breakers["https://a.example:443"]
    b = breakers.get("https://b.example:443")
    a.record_failure(0)
    assert a.state == "open"
    assert b.state == "closed"
    assert (breakers.states(0)) == {
        "https://a.example:443": "open",
        "https://b.example:443": "closed",
    }
    assert len(breakers) == 2


# --- properties -------------------------------------------------------------------------------

operations = st.lists(
    st.tuples(
        st.sampled_from(["allow", "success", "failure", "release"]),
        st.floats(min_value=0, max_value=20, allow_nan=False),
    ),
    max_size=80,
)


@given(
    threshold=st.integers(min_value=1, max_value=5),
    open_seconds=st.floats(min_value=0, max_value=30),
    ops=operations,
)
def test_never_two_half_open_trials_at_once(
    threshold: int, open_seconds: float, ops: list[tuple[str, float]]
) -> None:
    """Between a half-open grant and the next reported result, every caller is refused."""
    breaker = Breaker(threshold, open_seconds)
    now = 0.0
    trial_outstanding = False
    for op, step in ops:
        now += step
        if op == "allow":
            allowed = breaker.allow(now)
            if allowed and breaker.state == "half_open":
                assert not trial_outstanding, "a second trial while one is in flight"
                trial_outstanding = True
        else:
            getattr(breaker, "record_" + op if op != "release" else op)(now)
            trial_outstanding = False


@given(
    threshold=st.integers(min_value=1, max_value=5),
    open_seconds=st.floats(min_value=0, max_value=30),
    ops=operations,
)
def test_a_success_always_closes(
    threshold: int, open_seconds: float, ops: list[tuple[str, float]]
) -> None:
    breaker = Breaker(threshold, open_seconds)
    now = 0.0
    for op, step in ops:
        now += step
        if op == "allow":
            breaker.allow(now)
        elif op == "release":
            breaker.release(now)
        else:
            getattr(breaker, "record_" + op)(now)
        if op == "success":
            assert breaker.state == "closed"
            assert breaker.state_at(now + 1000) == "closed"
            assert breaker.allow(now)


@given(
    threshold=st.integers(min_value=1, max_value=5),
    open_seconds=st.floats(min_value=0.001, max_value=30),
    ops=operations,
)
def test_open_never_allows_before_its_pause_ends_and_closed_always_allows(
    threshold: int, open_seconds: float, ops: list[tuple[str, float]]
) -> None:
    breaker = Breaker(threshold, open_seconds)
    now = 0.0
    for op, step in ops:
        now += step
        before = breaker.state_at(now)
        retry_at = breaker.retry_at()
        if op == "allow":
            allowed = breaker.allow(now)
            if before == "closed":
                assert allowed
            if before == "open":
                assert retry_at is not None and now < retry_at
                assert not allowed
        elif op == "release":
            breaker.release(now)
        else:
            getattr(breaker, "record_" + op)(now)
        if breaker.state == "closed":
            assert breaker.consecutive_failures < threshold
