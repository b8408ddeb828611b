"""Files written whole or not at all."""

import os
from pathlib import Path


def nearest_existing(path) -> Path:
    """PATH, or the nearest of its parents that exists (where creating PATH begins)."""
    return next(candidate for candidate in (Path(path), *Path(os.path.abspath(path)).parents) if candidate.exists())


def write_atomic(path, content) -> None:
    """Write CONTENT (text, or a function that writes the file at the path it is given) to PATH whole or not at
    all: first to the hidden .NAME.partial beside it, then renamed over PATH; a failed write leaves PATH as it was
    and no partial file behind."""
    partial = Path(path).with_name(f".{Path(path).name}.partial")
    try:
        if callable(content):
            content(partial)
        else:
            partial.write_text(content)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
