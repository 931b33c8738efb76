"""Where the repository's files are, for tests that read what it ships."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ETC = REPO / "etc"
