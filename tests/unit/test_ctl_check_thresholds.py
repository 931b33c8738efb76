"""echoctl check: the guidelines' threshold ranges and plain-decimal perfdata numbers."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from echod.ctl.check import InvalidRange, ThresholdRange
from echod.ctl.output import plain_number

PLAIN = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")


@pytest.mark.parametrize(
    ("text", "start", "end", "inside"),
    [
        ("10", 0.0, 10.0, False),
        ("10:", 10.0, math.inf, False),
        ("~:10", -math.inf, 10.0, False),
        ("10:20", 10.0, 20.0, False),
        ("@10:20", 10.0, 20.0, True),
        (":5", 0.0, 5.0, False),
        ("-5:-1", -5.0, -1.0, False),
        ("0.5", 0.0, 0.5, False),
        ("1e6", 0.0, 1e6, False),
    ],
)
def test_ranges_parse(text: str, start: float, end: float, inside: bool) -> None:
    assert ThresholdRange.parse(text) == ThresholdRange(start, end, inside)


@pytest.mark.parametrize(
    ("text", "alerting", "quiet"),
    [
        ("10", [-1, 10.5, 11], [0, 5, 10]),
        ("10:", [9.99, 0, -3], [10, 11, 1e9]),
        ("~:10", [10.01, 11], [-1e9, 0, 10]),
        ("10:20", [9, 21], [10, 15, 20]),
        ("@10:20", [10, 15, 20], [9.99, 20.01]),
    ],
)
def test_ranges_alert_as_the_guidelines_say(
    text: str, alerting: list[float], quiet: list[float]
) -> None:
    threshold = ThresholdRange.parse(text)
    assert all(threshold.alerts(value) for value in alerting)
    assert not any(threshold.alerts(value) for value in quiet)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("10", "10"),
        ("10:", "10:"),
        ("~:10", "~:10"),
        ("10:20", "10:20"),
        ("@10:20", "@10:20"),
        ("1e6", "1000000"),
        ("0.00001", "0.00001"),
        ("@1e-5:2E6", "@0.00001:2000000"),
    ],
)
def test_ranges_are_shown_in_range_syntax(text: str, shown: str) -> None:
    assert ThresholdRange.parse(text).describe() == shown


@pytest.mark.parametrize(
    "text", ["", "abc", "20:10", "@", "1:2:3", "~", "10:~", "nan", "inf", "1e999", "@@1"]
)
def test_invalid_ranges_are_refused(text: str) -> None:
    with pytest.raises(InvalidRange):
        ThresholdRange.parse(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [(1e6, "1000000"), (1e-5, "0.00001"), (0.0, "0"), (-0.0, "0"), (50.0, "50"), (-2.5, "-2.5")],
)
def test_plain_numbers(value: float, text: str) -> None:
    assert plain_number(value) == text


@given(st.floats(min_value=-1e15, max_value=1e15, allow_nan=False, allow_infinity=False))
def test_plain_numbers_use_only_digits_minus_and_a_point(value: float) -> None:
    text = plain_number(value)
    assert PLAIN.match(text), text
    assert float(text) == value  # and no precision lost


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_a_range_reads_back_from_its_description(value: float) -> None:
    threshold = ThresholdRange.parse(plain_number(value))
    assert ThresholdRange.parse(threshold.describe()) == threshold
