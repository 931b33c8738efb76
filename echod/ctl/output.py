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


def human_bytes(value: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value}"


def aligned(rows: list[tuple[str, ...]], left_column: int) -> list[str]:
    """Rows as lines of columns two spaces apart: numbers right-aligned, the one
    text column (left_column) left-aligned, trailing blanks trimmed."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(width) if i == left_column else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
