"""`python -m docgen [OUTDIR]`: (re)write the generated files (default: echod/data)."""

from __future__ import annotations

import sys
from pathlib import Path

from docgen import generate

if __name__ == "__main__":
    root = Path(__file__).resolve().parents[2]
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "echod" / "data"
    for path in generate.write_all(out, root):
        print(path)
