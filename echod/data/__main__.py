"""`python -m echod.data`: print where the man pages and completions are installed."""

from pathlib import Path

print(Path(__file__).resolve().parent)
