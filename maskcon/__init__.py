"""maskcon: MaskCon (Feng & Patras, CVPR 2023) and its baselines for coarse-labelled datasets."""

__version__ = "0.1.0"


def usable_cpus() -> int:
    """The CPU cores this process may run on: its affinity (as SLURM, containers and taskset set it) where the
    platform has one, else every core of the machine."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def count(number: float, one: str, many: str | None = None) -> str:
    """NUMBER with its noun: "1 epoch", "3 epochs", "2 processes" (MANY where the plural is not ONE + "s")."""
    return f"{number:g} {one if number == 1 else many or one + 's'}"


def write_atomic(path, content) -> None:
    """Write CONTENT (text, or a function that writes the file at the path it is given) to PATH whole or not at
    all: first to the hidden .NAME.partial beside it, then renamed over PATH; a failed write leaves PATH as it was
    and no partial file behind."""
    import os
    from pathlib import Path

    partial = Path(path).with_name(f".{Path(path).name}.partial")
    try:
        if callable(content):
            content(partial)
        else:
            partial.write_text(content)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_backbone(path, map_location="cpu"):
    """The trained encoder of a run folder or its backbone.pt, with `.metadata` (see maskcon.backbone)."""
    from maskcon.backbone import load_backbone as load

    return load(path, map_location=map_location)
