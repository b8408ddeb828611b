"""maskcon: MaskCon (Feng & Patras, CVPR 2023) and its baselines for coarse-labelled datasets."""

__version__ = "0.1.0"

from maskcon.files import write_atomic  # noqa: E402,F401  (maskcon.write_atomic: every write of the package)


def usable_cpus() -> int:
    """The CPU cores this process may run on: its affinity (as SLURM, containers and taskset set it) where the
    platform has one, else every core of the machine."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def count(number: float, one: str, many: str | None = None) -> str:
    """NUMBER with its noun: "1 epoch", "3 epochs", "2 processes" (MANY where the plural is not ONE + "s")."""
    return f"{number:g} {one if number == 1 else many or one + 's'}"


def load_backbone(path, map_location="cpu"):
    """The trained encoder of a run folder or its backbone.pt, with `.metadata` (see maskcon.backbone)."""
    from maskcon.backbone import load_backbone as load

    return load(path, map_location=map_location)
