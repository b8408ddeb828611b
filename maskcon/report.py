"""Finished runs -> the paper's table layout: Markdown and CSV (mean and spread over seeds), a Recall@K plot,
with the supplement's published figures beside ours where its tables have the row.

A run is read from its folder (config.yaml, results.json) or from W&B (config, summary). Runs form one row
only when every option that defines a run (those a resume must match, `checkpoints.MUST_MATCH_ON_RESUME`,
with the global batch for the batch and the processes) is equal but the seed. Rows are (dataset, method, w,
tau), with w and tau shown only for the methods that read them ("–" in the tables, left out of the plot's
legend). Unfinished runs (no results.json: still running or stopped by a signal) and runs whose files are
damaged are left out, each named; so are runs stopped early (--max-steps) and runs of another recipe than the
paper's (the dataset's preset), which `--all` shows as rows of their own, labelled by what differs, without the
paper's figures beside them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from maskcon import count, rundir
from maskcon.datasets import DATASETS as PRESET_DATASETS
from maskcon.errors import OneLineParser, UserError, file_in_the_way
from maskcon.methods import METHODS

PAPER_KS = (1, 2, 5, 10)   # the Recall@K columns of the supplement's tables
METHOD_ORDER = ("supfine", "grafit", "coins", "maskcon", "selfcon")   # the tables' row order
NOT_APPLICABLE = "–"   # a table's cell with nothing to show: w or tau a method ignores, a figure not published
METHOD_NAMES = {"supfine": "SupFINE", "grafit": "Grafit", "coins": "CoIns", "maskcon": "MaskCon", "selfcon": "SelfCon"}


def _rows(table: int, dataset: str, text: str) -> dict:
    """Parse lines "method w tau R@1 R@2 R@5 R@10" ('/' for no w or tau) as typed from a table."""
    rows = {}
    for line in text.strip().splitlines():
        method, w, t, *recall = line.split()
        key = (dataset, method, None if w == "/" else float(w), None if t == "/" else float(t))
        rows[key] = (table, tuple(float(value) for value in recall))
    return rows


# The supplement's Tables 4-8, Recall@1, 2, 5, 10 in percent, typed from the paper as published (Table 6's
# CoIns w 1.0 good-split R@2 reads 8.26 there).
PUBLISHED: dict[tuple, tuple[int, tuple[float, ...]]] = {
    **_rows(4, "cifar100", """
supfine / / 71.13 80.03 87.61 91.59
grafit 0.2 / 47.80 59.41 73.29 82.17
grafit 0.5 / 57.78 68.24 80.01 87.05
grafit 0.8 / 60.57 71.13 82.32 89.21
grafit 1.0 / 58.65 70.04 82.18 89.09
coins 0.2 / 56.93 68.51 80.90 87.88
coins 0.5 / 60.10 70.89 83.14 89.52
coins 0.8 / 59.35 70.40 83.19 89.82
coins 1.0 / 47.25 61.24 77.78 87.00
maskcon 0.5 0.01 54.22 65.31 77.45 85.12
maskcon 0.5 0.05 58.89 68.91 80.02 86.89
maskcon 0.5 0.1 60.18 70.41 81.81 88.25
maskcon 0.5 0.5 57.46 68.27 79.86 87.05
maskcon 1.0 0.01 61.41 71.22 81.44 87.70
maskcon 1.0 0.05 65.52 74.46 83.64 89.25
maskcon 1.0 0.1 62.52 72.51 83.27 89.18
maskcon 1.0 0.5 59.76 70.28 81.97 88.58
selfcon / / 40.50 51.83 66.23 76.66"""),
    **_rows(5, "sop_split1", """
supfine / / 83.94 88.04 91.95 94.00
grafit 0.2 / 71.04 76.17 81.85 85.51
grafit 0.5 / 72.66 77.43 82.89 86.40
grafit 0.8 / 74.02 78.82 84.13 87.91
grafit 1.0 / 53.69 59.55 67.12 72.78
coins 0.2 / 70.75 76.32 82.24 86.16
coins 0.5 / 70.84 76.01 82.20 86.08
coins 0.8 / 67.68 73.26 80.04 84.18
coins 1.0 / 36.35 42.39 50.30 56.52
maskcon 0.2 0.1 72.35 77.34 82.92 86.46
maskcon 0.5 0.05 70.87 76.17 82.11 85.92
maskcon 0.5 0.1 73.22 78.34 83.98 87.35
maskcon 0.8 0.05 68.53 73.72 79.86 84.22
maskcon 0.8 0.1 74.05 78.97 84.48 87.96
selfcon / / 70.36 75.57 81.53 85.13"""),
    **_rows(6, "cifartoy_good", """
supfine / / 94.14 96.61 98.03 98.65
grafit 0.2 / 85.34 91.38 96.05 97.85
grafit 0.5 / 86.61 92.33 97.01 98.38
grafit 0.8 / 86.23 92.56 96.69 98.50
grafit 1.0 / 73.84 84.25 92.14 95.46
coins 0.2 / 85.74 91.88 96.41 98.60
coins 0.5 / 86.00 92.25 96.91 98.60
coins 0.8 / 86.15 92.76 97.21 98.76
coins 1.0 / 76.30 8.26 94.65 97.46
maskcon 0.5 0.01 87.44 93.01 96.95 98.38
maskcon 0.5 0.05 88.09 93.18 96.99 98.51
maskcon 0.5 0.1 87.13 92.95 96.93 98.44
maskcon 0.5 0.5 86.31 92.49 96.74 98.53
maskcon 1.0 0.01 88.24 93.44 97.01 98.26
maskcon 1.0 0.05 90.28 94.04 97.33 98.53
maskcon 1.0 0.1 78.25 87.10 94.26 96.85
maskcon 1.0 0.5 79.58 88.10 94.58 96.99
selfcon / / 84.84 91.73 96.14 97.94"""),
    **_rows(6, "cifartoy_bad", """
supfine / / 94.11 96.53 98.45 98.96
grafit 0.2 / 86.33 92.31 96.63 98.18
grafit 0.5 / 87.94 93.63 97.59 98.76
grafit 0.8 / 89.96 94.36 97.71 98.90
grafit 1.0 / 84.66 90.93 95.15 96.71
coins 0.2 / 89.80 94.13 97.18 98.30
coins 0.5 / 90.14 94.11 97.78 98.70
coins 0.8 / 90.55 94.94 97.73 98.71
coins 1.0 / 87.15 92.85 96.78 98.34
maskcon 0.5 0.01 88.89 93.84 97.20 98.38
maskcon 0.5 0.05 90.21 94.41 97.41 98.56
maskcon 0.5 0.1 88.29 93.61 97.25 98.54
maskcon 0.5 0.5 88.46 93.43 97.63 98.70
maskcon 1.0 0.01 90.53 94.23 97.51 98.55
maskcon 1.0 0.05 91.56 95.23 97.70 98.70
maskcon 1.0 0.1 88.44 93.65 97.10 98.34
maskcon 1.0 0.5 88.25 93.33 96.99 98.19
selfcon / / 84.83 91.55 96.35 98.16"""),
    **_rows(7, "sop_split2", """
supfine / / 69.56 75.70 83.24 87.88
grafit 0.2 / 36.85 42.52 50.23 57.04
grafit 0.5 / 37.98 43.69 51.67 57.98
grafit 0.8 / 39.12 44.66 53.10 59.65
grafit 1.0 / 25.07 29.24 35.85 41.59
coins 0.2 / 38.22 45.19 54.37 61.18
coins 0.5 / 38.18 45.06 54.17 61.28
coins 0.8 / 36.72 42.49 51.23 58.61
coins 1.0 / 22.56 26.34 33.28 38.95
maskcon 0.2 0.05 39.69 45.69 53.70 60.05
maskcon 0.5 0.05 45.36 51.07 58.91 65.52
maskcon 0.8 0.05 43.84 50.03 58.18 64.19
maskcon 1.0 0.05 41.05 46.70 54.74 60.98
selfcon / / 35.85 41.46 49.77 56.11"""),
    **_rows(8, "cars196", """
supfine / / 78.09 82.97 86.51 88.04
grafit 0.2 / 23.64 32.69 46.35 57.98
grafit 0.5 / 28.83 38.96 53.99 65.08
grafit 0.8 / 35.58 47.97 64.47 75.28
grafit 1.0 / 42.30 54.79 71.10 81.74
coins 0.2 / 32.30 43.19 59.11 71.10
coins 0.5 / 36.71 48.80 65.33 76.16
coins 0.8 / 38.71 49.04 67.28 79.23
coins 1.0 / 42.77 55.60 72.29 82.53
maskcon 1.0 0.01 27.87 38.19 52.80 64.13
maskcon 1.0 0.05 33.04 43.69 59.10 70.59
maskcon 1.0 0.1 45.53 58.56 74.36 84.36
maskcon 1.0 0.5 42.84 55.23 71.57 81.72
selfcon / / 20.97 28.75 41.44 52.61"""),
}


# The options of a run that define it (checkpoints.MUST_MATCH_ON_RESUME, with the global batch for the batch
# and the processes) but the seed and the row's own keys: runs pool into a row only when all are equal.
DEFINING = ("arch", "image_size", "global_batch", "queue_size", "t0", "lr", "lr_reference_batch", "scale_lr",
            "warmup_epochs", "epochs", "momentum", "weight_decay", "query_view", "key_view", "key_momentum",
            "proj_hidden", "proj_dim", "pretrained", "loader", "mixed_precision", "max_steps")
# Of those, what the paper's recipe (the dataset's preset) fixes; the others (loader, precision) may differ.
RECIPE = tuple(name for name in DEFINING if name not in ("loader", "mixed_precision"))


@dataclass
class Row:
    """One line of a table: the runs of one (dataset, method, w, tau) over seeds; `variant` names how its
    runs differ from the paper's recipe ("" for the recipe's rows)."""

    dataset: str
    method: str
    w: float | None
    t: float | None
    variant: str = ""
    detail: str = ""   # how it differs from a row of the same keys and variant (loader, precision)
    options: tuple = ()   # (name, value) of the DEFINING options its runs share
    recalls: dict[int, list[float]] = field(default_factory=dict)   # K -> R@K of each seed, percent
    seeds: list[int] = field(default_factory=list)

    def mean(self, k: int) -> float | None:
        values = self.recalls.get(k, [])
        return sum(values) / len(values) if values else None

    def spread(self, k: int) -> float | None:
        """Sample standard deviation over seeds (None with fewer than two)."""
        values = self.recalls.get(k, [])
        if len(values) < 2:
            return None
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    def published(self) -> tuple[int, tuple[float, ...]] | None:
        """The supplement's figures of this row: only beside rows of the paper's recipe."""
        return None if self.variant else PUBLISHED.get((self.dataset, self.method, self.w, self.t))


def run_record(config: dict, results: dict, where: str) -> dict:
    """(dataset, method, w, t, seed, {K: R@K}) of one finished run; w, t None when its method ignores them."""
    missing = [name for name in ("dataset", "method", "seed") if name not in config]
    if missing or config["method"] not in METHODS:
        raise UserError(f"{where} is not a maskcon run (its configuration lacks {', '.join(missing) or 'a method'})")
    method = METHODS[config["method"]]
    recalls = {int(name[2:]): float(value) for name, value in results.items()
               if name.startswith("R@") and name[2:].isdigit() and isinstance(value, (int, float))
               and not isinstance(value, bool)}
    if 1 not in recalls or len(recalls) != sum(name.startswith("R@") for name in results):
        raise UserError(f"{where}: its results hold no Recall@K figures (R@1 missing, or a figure not a number)")
    # runs of `--dataset folder` on different shards are of different datasets: each folder its own table
    dataset = config["dataset"]
    if dataset == "folder":
        dataset = f"folder {config.get('shards') or 'shards/folder'}"
    # a whole number read from YAML or typed (1.0) is the preset's (1); a --max-steps the run never reached
    # (it finished its epochs) did not change it
    config = {name: int(value) if isinstance(value, float) and value.is_integer() else value
              for name, value in config.items()}
    if results.get("stopped") == "finished":
        config["max_steps"] = None
    return {"dataset": dataset, "method": config["method"], "seed": config["seed"],
            "w": float(config["w"]) if method.uses_w else None, "t": float(config["t"]) if method.uses_t else None,
            "recalls": recalls, "where": where, "options": {name: config[name] for name in DEFINING if name in config},
            "variant": _variant(config)}


def _variant(config: dict) -> str:
    """How a run differs from the paper's recipe: "" when it follows it; else each option that differs from
    the dataset's preset, as "name value"."""
    from maskcon.config import parse_config

    if config.get("dataset") not in PRESET_DATASETS:
        return ""
    preset = parse_config(["--dataset", config["dataset"], "--method", config["method"]], processes=1)
    expected = {**{name: getattr(preset, name) for name in RECIPE if hasattr(preset, name)},
                "global_batch": preset.batch_size}
    return ", ".join(f"{name} {_option(config[name])}" for name in RECIPE
                     if name in config and config[name] != expected.get(name))


def read_run_folders(paths: list[Path], log=lambda line: print(line, file=sys.stderr)) -> list[dict]:
    """Records of the finished runs under `paths` (run folders, or folders that hold run folders at any depth,
    as runs/SWEEP/POINT); an unfinished run (no results.json) or one whose files are damaged is named through
    `log` and left out."""
    records = []
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path} is not a folder; pass run folders (runs/NAME) or the folder that holds them")
        folders = run_folders(path)
        if not folders:
            raise UserError(f"{path} holds no run (no config.yaml in it or the folders below it)")
        for folder in folders:
            if not (folder / rundir.RESULTS).exists():
                log(f"{folder}: no results.json (unfinished); left out")
                continue
            try:
                records.append(run_record(_mapping(folder / rundir.CONFIG, yaml.safe_load),
                                          _mapping(folder / rundir.RESULTS, json.loads), str(folder)))
            except UserError as error:
                log(f"{error}; left out")
    return records


def run_folders(path: Path, seen: set[Path] | None = None) -> list[Path]:
    """The run folders (those holding config.yaml) at or below PATH, in name order; a run folder's own
    subfolders (checkpoints/, wandb/) are not searched, and a folder reached twice (through links) counts once."""
    seen = set() if seen is None else seen
    if path.resolve() in seen:
        return []
    seen.add(path.resolve())
    if (path / rundir.CONFIG).exists():
        return [path]
    try:
        below = sorted(child for child in path.iterdir() if child.is_dir())
    except OSError as error:
        raise UserError(f"cannot look for runs in {path} ({error.strerror}); fix its permissions, or name the run "
                        f"folders") from None
    return [folder for child in below for folder in run_folders(child, seen)]


def _mapping(path: Path, parse) -> dict:
    """The mapping that `parse` reads from the file at PATH; UserError naming the file when it is damaged."""
    try:
        value = parse(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        raise UserError(f"{path} is damaged ({str(error).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is damaged (not a mapping)")
    return value


def read_wandb(path: str) -> list[dict]:
    """Records of the finished runs of a W&B project ENTITY/PROJECT or sweep ENTITY/PROJECT/SWEEP_ID."""
    import wandb

    parts = path.strip("/").split("/")
    if len(parts) not in (2, 3):
        raise UserError(f"--wandb {path!r}: give ENTITY/PROJECT or ENTITY/PROJECT/SWEEP_ID")
    try:
        api = wandb.Api()
        runs = api.sweep("/".join(parts)).runs if len(parts) == 3 else api.runs("/".join(parts))
        return [run_record(dict(run.config), dict(run.summary), run.url) for run in runs
                if run.state == "finished" and "R@1" in run.summary]
    except (wandb.errors.Error, ValueError) as error:
        raise UserError(f"--wandb {path}: W&B cannot be read ({str(error).splitlines()[0]}); log in (wandb login) "
                        f"and check the name and the network, or pass the run folders") from None


def group(records: list[dict], *, everything: bool = False,
          log=lambda line: print(line, file=sys.stderr)) -> list[Row]:
    """Rows over seeds, ordered by dataset (first seen), then the tables' method order, w, tau, variant.
    Runs of another recipe than the paper's are named through `log` and left out, unless `everything`."""
    rows: dict[tuple, Row] = {}
    where: dict[tuple, str] = {}       # (row key, seed) -> the run that gave it
    for record in records:
        variant = record.get("variant", "")
        if variant and not everything:
            log(f"{record['where']}: not a full run of {_recipe(record['dataset'])} ({variant}); left out (--all "
                f"shows it as a row of its own)")
            continue
        options = tuple(sorted((name, str(value)) for name, value in record.get("options", {}).items()))
        key = (record["dataset"], record["method"], record["w"], record["t"], variant, options)
        row = rows.setdefault(key, Row(*key[:5], options=options))
        if record["seed"] in row.seeds:    # a repeat of a run: a row counts each seed once
            log(f"{record['where']}: the same options and seed {record['seed']} as {where[key, record['seed']]} "
                f"({_label(row)}); left out, the row counts each seed once (another --seed makes a run count)")
            continue
        where[key, record["seed"]] = record["where"]
        row.seeds.append(record["seed"])
        for k, value in record["recalls"].items():
            row.recalls.setdefault(k, []).append(value)
    datasets = list(dict.fromkeys(key[0] for key in rows))
    order = lambda key: (datasets.index(key[0]), METHOD_ORDER.index(key[1]) if key[1] in METHOD_ORDER else 99,
                         key[2] if key[2] is not None else -1, key[3] if key[3] is not None else -1,
                         key[4], key[5])  # noqa: E731
    ordered = [rows[key] for key in sorted(rows, key=order)]
    alike = {}
    for row in ordered:
        alike.setdefault((row.dataset, row.method, row.w, row.t, row.variant), []).append(row)
    for group_of_rows in alike.values():   # rows that would look alike are told apart by what differs
        values = [dict(row.options) for row in group_of_rows]
        differing = [name for name in DEFINING if len({value.get(name) for value in values}) > 1]
        for row, value in zip(group_of_rows, values):
            row.detail = ", ".join(f"{name} {_option(value.get(name))}" for name in differing)
    return ordered


def _recipe(dataset: str) -> str:
    """Whose recipe a dataset's preset is: the paper's where the supplement has its table, else maskcon's own."""
    preset = dataset.split()[0]          # "folder SHARDS": the folder preset
    return "the paper's recipe" if any(key[0] == preset for key in PUBLISHED) else f"the {preset} preset"


def _option(value) -> str:
    """An option's value as a user types it: none, true and false, not Python's None, True and False."""
    return str(value).lower() if value is None or isinstance(value, bool) else str(value)


def _label(row: Row) -> str:
    return f"{row.dataset} {row.method}{_keys(row)}" + _qualifier(row)


def _keys(row: Row) -> str:
    """" w 1 τ 0.05": the w and tau of a row whose method reads them."""
    return "".join(f" {name} {value:g}" for name, value in (("w", row.w), ("τ", row.t)) if value is not None)


def _qualifier(row: Row) -> str:
    """What sets a row apart: its difference from the paper's recipe, then [loader, precision] where
    another row of the same keys differs in them."""
    return (f" ({row.variant})" if row.variant else "") + (f" [{row.detail}]" if row.detail else "")


def _shown(value: float | None) -> str:
    return NOT_APPLICABLE if value is None else f"{value:g}"


def _cell(row: Row, k: int) -> str:
    mean, spread = row.mean(k), row.spread(k)
    if mean is None:
        return ""
    return f"{mean:.2f}" if spread is None else f"{mean:.2f} ± {spread:.2f}"


def markdown(rows: list[Row], ks=PAPER_KS) -> str:
    """One Markdown table per dataset: ours (mean ± sample std over seeds) and, where the supplement has a figure
    for one of its rows, the supplement's figures."""
    blocks = []
    for dataset in dict.fromkeys(row.dataset for row in rows):
        chosen = [row for row in rows if row.dataset == dataset]
        tables = sorted({row.published()[0] for row in chosen if row.published()})
        title = f"### {dataset}" + (f" (supplement Table {', '.join(map(str, tables))})" if tables else "")
        papers = len(ks) if tables else 0     # no paper columns for a table of rows the paper has no figure for
        head = ["Method", "w", "τ", "seeds", *[f"R@{k}" for k in ks], *[f"paper R@{k}" for k in ks[:papers]]]
        lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in chosen:
            paper = row.published()
            figures = [f"{value:.2f}" for value in paper[1]] if paper else [NOT_APPLICABLE] * len(ks)
            name = METHOD_NAMES.get(row.method, row.method) + _qualifier(row)
            cells = [name, _shown(row.w), _shown(row.t), str(len(row.seeds)),
                     *[_cell(row, k) for k in ks], *figures[:papers]]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def write_csv(rows: list[Row], path: Path, ks=PAPER_KS) -> None:
    """One line per row: keys, seeds, mean and std of every R@K we have, the paper's table and figures."""
    all_ks = sorted({k for row in rows for k in row.recalls} | set(ks))
    header = ["dataset", "method", "w", "t", "variant", "detail", "seeds",
              *[f"R@{k}_{part}" for k in all_ks for part in ("mean", "std")],
              "paper_table", *[f"paper_R@{k}" for k in ks]]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for row in rows:
            paper = row.published()
            writer.writerow([row.dataset, row.method, "" if row.w is None else row.w, "" if row.t is None else row.t,
                             row.variant, row.detail, len(row.seeds), *[_number(value) for k in all_ks for value in (row.mean(k), row.spread(k))],
                             paper[0] if paper else "", *(paper[1] if paper else [""] * len(ks))])


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def recall_figure(rows: list[Row]):
    """Recall@K against K, one panel per dataset: ours (error bars: std over seeds), the paper's dashed; the K
    axis (log scale) is labelled with the K values plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(row.dataset for row in rows))
    most = max(sum(row.dataset == dataset for row in rows) for dataset in datasets)   # legend entries of a panel
    figure, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.6 + 0.3 * most), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        chosen = [row for row in rows if row.dataset == dataset]
        for index, row in enumerate(chosen):
            colour = f"C{index % 10}"
            ks = sorted(row.recalls)
            label = f"{METHOD_NAMES.get(row.method, row.method)}{_keys(row)}{_qualifier(row)} (n={len(row.seeds)})"
            axis.errorbar(ks, [row.mean(k) for k in ks], yerr=[row.spread(k) or 0.0 for k in ks], color=colour,
                          marker="o", capsize=3, label=textwrap.fill(label, 70))   # within the panel's width
            if row.published():
                axis.plot(PAPER_KS, row.published()[1], color=colour, linestyle="--", marker="x")
        if any(row.published() for row in chosen):
            axis.plot([], [], color="grey", linestyle="--", marker="x", label="dashed: the supplement's figures")
        axis.set_xscale("log")
        ticks = sorted({k for row in chosen for k in row.recalls} | {k for row in chosen if row.published()
                                                                      for k in PAPER_KS})
        axis.set_xticks(ticks, [str(k) for k in ticks])
        axis.minorticks_off()
        axis.set_xlabel("K")
        axis.set_ylabel("Recall@K of the fine labels, %")
        axis.set_title(dataset)
        low, high = axis.get_ylim()
        axis.set_ylim(max(low, 0.0), min(high, 101.0))      # a recall is a share: 0 to 100 %
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)   # below the panel
    figure.suptitle("Recall@K on the test split: mean over seeds (bars: std)")
    figure.tight_layout()
    return figure


def plot(rows: list[Row], path: Path) -> None:
    """recall_figure() as a PNG at PATH, its title and legend also as the PNG's text entries."""
    import matplotlib.pyplot as plt

    from maskcon.plots import figure_texts

    figure = recall_figure(rows)
    entries = [" ".join(text.get_text().split()) for axis in figure.axes for text in axis.get_legend().get_texts()]
    try:        # "tight": the legends below the panels are inside the picture
        figure.savefig(path, format="png", dpi=120, bbox_inches="tight",
                       metadata=figure_texts(figure.get_suptitle(), entries))
    finally:
        plt.close(figure)


def build_parser():

    parser = OneLineParser(
        prog="python launch/report.py",
        description="Turn finished runs into the supplement's table layout: Markdown on stdout, and "
                    "OUT/report.md, OUT/report.csv, OUT/recall.png. Runs form one row only when every option "
                    "that defines a run (those a resume must match: dataset, method, w, tau, batch, lr, "
                    "schedule, epochs, ...) is equal but --seed. Unfinished runs (no results.json: still running, "
                    "or stopped by a signal), runs with damaged files, runs stopped early by --max-steps and "
                    "runs of another recipe than the paper's are left out, each named on stderr; the paper's "
                    "figures stand only beside rows of its recipe.")
    parser.add_argument("runs", nargs="*", type=Path,
                        help="run folders, or folders that hold run folders at any depth (runs/, runs/SWEEP)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT[/SWEEP_ID]", default=None,
                        help="also read the finished runs of a W&B project or sweep (needs the network and a login)")
    parser.add_argument("--out", type=Path, default=Path("report"), help="folder for report.md, report.csv and "
                                                                         "recall.png (default: report)")
    parser.add_argument("--all", action="store_true", dest="everything",
                        help="also show the finished runs stopped early by --max-steps or of another recipe, as rows "
                             "of their own labelled by what differs (never pooled with the paper's recipe)")
    return parser


def main(argv: list[str]) -> int:
    """launch/report.py (through maskcon.cli, which prints a UserError as its one line): 0 when the report is
    written."""
    args = build_parser().parse_args(argv)
    if not args.runs and args.wandb is None:
        raise UserError("name the runs: run folders (or runs/), and/or --wandb ENTITY/PROJECT[/SWEEP_ID]")
    if file_in_the_way(args.out):
        raise UserError(f"--out {args.out}: {file_in_the_way(args.out)} is a file, not a folder; name a folder for "
                        f"the report (default: report)")
    records = read_run_folders(args.runs) + (read_wandb(args.wandb) if args.wandb else [])
    if not records:
        raise UserError("no finished run among those named (each run left out is named above; a finished run has "
                        "results.json)")
    rows = group(records, everything=args.everything)
    if not rows:
        raise UserError("no finished run of its dataset's full recipe among those named (each run left out is "
                        "named above); --all shows them as rows of their own")
    text = markdown(rows)
    write_report(rows, text, args.out)
    print(text, end="")
    print(f"wrote {args.out / 'report.md'}, {args.out / 'report.csv'}, {args.out / 'recall.png'} "
          f"({count(sum(len(row.seeds) for row in rows), 'run')} in {count(len(rows), 'row')})", file=sys.stderr)
    return 0


def write_report(rows: list[Row], text: str, out: Path) -> None:
    """report.md (TEXT), report.csv and recall.png into the folder OUT, made when missing. All three are written
    beside their place first, then renamed into it; a failure is a UserError naming the system's reason, and
    leaves no partial file and no folder made for it."""
    made = [folder for folder in (out, *out.parents) if not folder.exists()]   # deepest first
    partial = {name: out / f"{name}.partial" for name in ("report.md", "report.csv", "recall.png")}
    try:
        out.mkdir(parents=True, exist_ok=True)
        partial["report.md"].write_text(text)
        write_csv(rows, partial["report.csv"])
        plot(rows, partial["recall.png"])
        for name, path in partial.items():
            os.replace(path, out / name)
    except BaseException as error:      # a failed write, or a stop: nothing of it stays
        with contextlib.suppress(OSError):
            for path in partial.values():
                path.unlink(missing_ok=True)
            for folder in made:
                folder.rmdir()
        if not isinstance(error, OSError):
            raise
        raise UserError(f"cannot write the report into {out} ({error.strerror or error}); free space or fix the "
                        f"permissions, or choose another --out") from None
