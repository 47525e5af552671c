"""The retry schedule: status classes, full-jitter backoff, Retry-After parsing."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.delivery import retry

PERMANENT = (400, 410, 413, 415, 422)
NOW = 1_700_000_000.0


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert retry.classify(status, PERMANENT) == "delivered"


@pytest.mark.parametrize("status", PERMANENT)
def test_listed_statuses_are_permanent(status: int) -> None:
    assert retry.classify(status, PERMANENT) == "permanent"


@pytest.mark.parametrize(
    "status", [301, 302, 307, 308, 401, 403, 404, 408, 409, 429, 500, 502, 503, 504, 599, 100]
)
def test_redirects_timeouts_throttling_server_errors_and_other_4xx_are_retried(
    status: int,
) -> None:
    assert retry.classify(status, PERMANENT) == "retry"


def test_a_status_is_permanent_only_when_listed() -> None:
    assert retry.classify(410, ()) == "retry"
    assert retry.classify(404, (404,)) == "permanent"


def test_backoff_doubles_its_cap_per_attempt() -> None:
    caps = [retry.backoff(n, initial_seconds=0.5, max_seconds=600, rand=1.0) for n in range(1, 6)]
    assert caps == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_backoff_cap_stops_at_max() -> None:
    assert retry.backoff(30, initial_seconds=0.5, max_seconds=600, rand=1.0) == 600
    assert retry.backoff(10_000_000, initial_seconds=0.5, max_seconds=600, rand=0.5) == 300


def test_backoff_is_full_jitter_from_zero() -> None:
    assert retry.backoff(5, initial_seconds=1, max_seconds=60, rand=0.0) == 0.0
    assert retry.backoff(5, initial_seconds=1, max_seconds=60, rand=0.25) == 4.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempt": 0, "rand": 0.5},
        {"attempt": 1, "rand": -0.1},
        {"attempt": 1, "rand": 1.5},
    ],
)
def test_backoff_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        retry.backoff(
            int(kwargs["attempt"]), initial_seconds=1, max_seconds=10, rand=kwargs["rand"]
        )


@given(
    attempt=st.integers(min_value=1, max_value=100_000),
    initial=st.floats(min_value=0.001, max_value=3600),
    maximum=st.floats(min_value=0.001, max_value=86_400),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_always_lies_within_zero_and_the_cap(
    attempt: int, initial: float, maximum: float, rand: float
) -> None:
    delay = retry.backoff(attempt, initial_seconds=initial, max_seconds=maximum, rand=rand)
    assert 0 <= delay <= min(maximum, initial * 2.0 ** min(attempt - 1, 1000))


@given(
    attempt=st.integers(min_value=1, max_value=60),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_backoff_cap_never_shrinks_with_more_attempts(attempt: int, rand: float) -> None:
    first = retry.backoff(attempt, initial_seconds=0.5, max_seconds=600, rand=rand)
    later = retry.backoff(attempt + 1, initial_seconds=0.5, max_seconds=600, rand=rand)
    assert first <= later


@pytest.mark.parametrize(
    ("value", "expected"),
    [("120", 120.0), ("0", 0.0), (" 7 ", 7.0), ("3600", 3600.0), ("86400", 3600.0)],
)
def test_retry_after_delta_seconds(value: str, expected: float) -> None:
    assert expected == retry.parse_retry_after(value, NOW)


@pytest.mark.parametrize("value", [None, "", "  ", "-5", "1.5", "soon", "٣", "Foo, 99 Bar"])
def test_retry_after_missing_negative_or_garbage_is_ignored(value: str | None) -> None:
    assert retry.parse_retry_after(value, NOW) is None


def test_retry_after_http_date_in_the_future() -> None:
    value = email.utils.formatdate(NOW + 90, usegmt=True)
    assert retry.parse_retry_after(value, NOW) == 90.0


def test_retry_after_http_date_in_the_past_means_now() -> None:
    assert retry.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == 0.0


def test_retry_after_obsolete_date_forms_are_read() -> None:
    # RFC 9110 asks recipients to accept the RFC 850 and asctime forms too.
    assert retry.parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", NOW) == 0.0
    assert retry.parse_retry_after("Sun Nov  6 08:49:37 1994", NOW) == 0.0


def test_retry_after_is_capped() -> None:
    far = email.utils.formatdate(NOW + 10 * 86_400, usegmt=True)
    assert retry.parse_retry_after(far, NOW) == retry.MAX_RETRY_AFTER_SECONDS
    assert retry.parse_retry_after("9" * 5000, NOW) == retry.MAX_RETRY_AFTER_SECONDS
    assert retry.parse_retry_after("120", NOW, cap_seconds=30) == 30.0


@given(st.text(max_size=64))
def test_retry_after_never_raises_and_is_never_negative(value: str) -> None:
    result = retry.parse_retry_after(value, NOW)
    assert result is None or 0 <= result <= retry.MAX_RETRY_AFTER_SECONDS
