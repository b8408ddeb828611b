"""Benchmarks behind `python launch/bench.py NAME`; each module exposes main(argv) -> exit status."""
from __future__ import annotations

import argparse
import json
import shlex
import statistics

from maskcon import usable_cpus
from maskcon.errors import OneLineParser, UserError
from maskcon.provenance import cpu_name


def parser(name: str, doc: str, **kwargs) -> OneLineParser:
    """The parser of `python launch/bench.py NAME`: the module's docstring as its help, and --json."""
    parser = OneLineParser(prog=f"python launch/bench.py {name}", description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def show(report: dict, as_json: bool) -> int:
    """Print the report as one JSON object or as text (`text`); exit status 0."""
    print(json.dumps(report, indent=1) if as_json else text(report))
    return 0


def text(report: dict) -> str:
    """A report as text: `name: value` per figure (a spread as `median (min-max)`); a mapping or list of
    mappings (one per mode, loader, case) as a table with a row each; any other mapping indented below its name."""
    lines = []
    for name, value in report.items():
        keyed = isinstance(value, dict)
        rows = list(value.values()) if keyed else value if isinstance(value, list) else None
        if rows and all(isinstance(row, dict) for row in rows):
            columns = list(dict.fromkeys(column for row in rows for column in row))
            lines += [f"{name}:", table([""] * keyed + columns,
                                        [[key] * keyed + [cell(row.get(column)) for column in columns]
                                         for key, row in zip(value if keyed else rows, rows)])]
        elif keyed and set(value) != {"median", "min", "max"}:       # a spread is one figure
            lines += [f"{name}:", *(f"  {line}" for line in text(value).splitlines())]
        else:
            lines.append(f"{name}: {cell(value)}")
    return "\n".join(lines)


def cell(value) -> str:
    """A value in a report's text: a float to 4 significant digits (whole from 1,000 on, with thousands
    separators), a spread as `median (min-max)`, a list's items apart by "; ", None as "-"."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e3 else f"{value:.4g}"
    if isinstance(value, dict) and set(value) == {"median", "min", "max"}:
        middle, low, high = (cell(value[end]) for end in ("median", "min", "max"))
        return middle if low == high else f"{middle} ({low}-{high})"
    if isinstance(value, (list, dict)):
        return json.dumps(value) if isinstance(value, dict) else "; ".join(map(cell, value))
    return str(value)


def table(header: list[str], rows: list[list]) -> str:
    """An aligned text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(item) for item in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(item.rjust(width) if i else item.ljust(width)
                               for i, (item, width) in enumerate(zip(row, widths))) for row in cells)


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
