"""How echoctl spells numbers: ping-like milliseconds, percentages without noise."""

from __future__ import annotations

import pytest

from echod.ctl.output import format_ms, format_percent


def test_milliseconds_keep_three_decimals() -> None:
    assert format_ms(0.1234) == "0.123"
    assert format_ms(12) == "12.000"


@pytest.mark.parametrize(
    ("value", "text"), [(0.0, "0"), (100.0, "100"), (100 / 3, "33.3"), (99.96, "100")]
)
def test_percent_drops_a_trailing_zero_decimal(value: float, text: str) -> None:
    assert format_percent(value) == text
