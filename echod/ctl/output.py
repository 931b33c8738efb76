"""How echoctl spells numbers in its human-readable output.

Kept apart from `options` (the argparse plumbing) so the probe engine can
describe what it saw without importing the command line.
"""

from __future__ import annotations

from decimal import Decimal


def format_ms(milliseconds: float) -> str:
    return f"{milliseconds:.3f}"


def format_percent(value: float) -> str:
    """0, 33.3, 100: whole numbers without decimals, the rest with one."""
    text = f"{value:.1f}"
    return text.removesuffix(".0")


def plain_number(value: float) -> str:
    """`value` as a plain decimal, never with an exponent: 1000000, 0.00001, -2.5.

    The monitoring plugin guidelines allow only `[-0-9.]` in perfdata, which
    Python's `g` and `repr` break for large and small numbers (`1e+06`). The
    shortest digits that read back as `value` (repr's), written out in full.
    """
    text = format(Decimal(repr(float(value))), "f")
    if "." in text:
        text = text.rstrip("0").removesuffix(".")
    return "0" if text in ("-0", "") else text
