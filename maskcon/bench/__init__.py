"""Benchmarks behind `python launch/bench.py NAME`; each module exposes main(argv) -> exit status."""
from __future__ import annotations

import shlex
import statistics

from maskcon import usable_cpus
from maskcon.errors import UserError
from maskcon.provenance import cpu_name


def machine(device=None) -> str:
    """Where a figure was measured, for the reports: the CPU model and the cores this process may use,
    torch's CPU threads, and the GPU's name when `device` (a torch.device) is a CUDA device."""
    import torch

    where = (f"on {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda"
             else "on the CPU")
    return f"{usable_cpus()} CPU cores ({cpu_name()}), {torch.get_num_threads()} torch threads, run {where}"


def spread(values: list[float], digits: int = 1) -> dict[str, float]:
    """A figure over repeats: its median, min and max, rounded to `digits` (0: whole numbers)."""
    return {name: round(value, digits or None) for name, value in
            (("median", statistics.median(values)), ("min", min(values)), ("max", max(values)))}


def positive(args, *names: str, least: int = 1) -> None:
    """One line (UserError) for the first option among `names` (argparse dests) below `least`."""
    for name in names:
        value = getattr(args, name)
        if (min(value) if isinstance(value, list) else value) < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


def command(name: str, argv: list[str]) -> str:
    """The command line of benchmark `name` with arguments argv, as a user types it."""
    return shlex.join(["python", "launch/bench.py", name, *argv])


def table(header: list[str], rows: list[list]) -> str:
    """An aligned text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))) for row in cells)


def nvidia_smi(query: str) -> str | None:
    """The first GPU's `query` field from nvidia-smi (e.g. "driver_version"), None without a GPU or nvidia-smi."""
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]
