"""How echoctl spells numbers in its human-readable output.

Kept apart from `options` (the argparse plumbing) so the probe engine can
describe what it saw without importing the command line.
"""

from __future__ import annotations


def format_ms(milliseconds: float) -> str:
    return f"{milliseconds:.3f}"


def format_percent(value: float) -> str:
    """0, 33.3, 100: whole numbers without decimals, the rest with one."""
    text = f"{value:.1f}"
    return text.removesuffix(".0")
