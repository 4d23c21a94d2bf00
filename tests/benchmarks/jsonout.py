"""How the benchmark scripts beside this one give their figures: JSON on stdout, and the same in a file."""

from __future__ import annotations

import json
from pathlib import Path


def emit(out: dict, path: Path | None, show: bool = True) -> None:
    """Print ``out`` as indented JSON (unless ``show`` is false) and write it to ``path`` when given."""
    text = json.dumps(out, indent=1)
    if show:
        print(text)
    if path is not None:
        path.write_text(text + "\n")
