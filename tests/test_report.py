"""launch/report.py's table: rows over seeds, the supplement's published figures beside ours."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from maskcon.report import PUBLISHED, group, markdown, read_run_folders
from tests.test_sweeps import SWEEPS, grid, load

ROOT = Path(__file__).resolve().parents[1]


def write_run(folder: Path, dataset: str, method: str, seed: int, recall: dict | None, w=1.0, t=0.05) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"dataset": dataset, "method": method, "seed": seed,
                                                        "w": w, "t": t}))
    if recall is not None:
        (folder / "results.json").write_text(json.dumps({"step": 10, **recall}))
    return folder


SUPPLEMENT = Path(__file__).resolve().parents[2] / "shared" / "seed" / "maskcon-supplement.md"
NAMES = {"SupFINE": "supfine", "Graft": "grafit", "CoIns": "coins", "MaskCon": "maskcon", "SelfCon": "selfcon"}
TABLE_DATASETS = {4: ["cifar100"], 5: ["sop_split1"], 6: ["cifartoy_good", "cifartoy_bad"], 7: ["sop_split2"],
                  8: ["cars196"]}


def supplement_tables(text: str) -> dict:
    """Tables 4-8 of the supplement's text: (dataset, method, w, tau) -> (table, (R@1, R@2, R@5, R@10)); a
    row without a method name continues the one above; Table 6 holds two splits side by side."""
    found, block, method = {}, [], None
    for line in text.splitlines():
        caption = re.match(r"Table (\d)\. Extra results", line)
        if caption and int(caption.group(1)) in TABLE_DATASETS:
            table = int(caption.group(1))
            for cells in block:
                method = NAMES.get(cells[0], method) if cells[0] else method
                w, t = (None if cell == "/" else float(cell) for cell in cells[1:3])
                figures = [float(re.sub(r"</?b>", "", cell)) for cell in cells[3:]]
                for part, dataset in enumerate(TABLE_DATASETS[table]):
                    found[(dataset, method, w, t)] = (table, tuple(figures[4 * part:4 * part + 4]))
            block = []
        elif "\t" in line and re.search(r"\d\.\d\d", line):
            block.append(line.split("\t"))
        elif not line.strip():
            continue
        else:
            block = [] if line.startswith("Method") else block
    return found


@pytest.mark.skipif(not SUPPLEMENT.is_file(), reason="the supplement is not beside the checkout")
def test_published_figures_are_every_row_of_the_supplements_tables_4_to_8():
    assert PUBLISHED == supplement_tables(SUPPLEMENT.read_text())


def test_published_figures_are_the_supplements_tables():
    counts = {}
    for (dataset, *_), (table, figures) in PUBLISHED.items():
        counts[dataset] = counts.get(dataset, 0) + 1
        assert len(figures) == 4
    assert counts == {"cifar100": 18, "sop_split1": 15, "cifartoy_good": 18, "cifartoy_bad": 18,
                      "sop_split2": 14, "cars196": 14}
    assert PUBLISHED[("cifar100", "maskcon", 1.0, 0.05)] == (4, (65.52, 74.46, 83.64, 89.25))
    assert PUBLISHED[("sop_split1", "grafit", 0.8, None)] == (5, (74.02, 78.82, 84.13, 87.91))
    assert PUBLISHED[("cifartoy_bad", "coins", 0.8, None)] == (6, (90.55, 94.94, 97.73, 98.71))
    assert PUBLISHED[("sop_split2", "selfcon", None, None)] == (7, (35.85, 41.46, 49.77, 56.11))
    assert PUBLISHED[("cars196", "maskcon", 1.0, 0.1)] == (8, (45.53, 58.56, 74.36, 84.36))


def test_every_grid_point_of_the_table_sweeps_has_its_published_row():
    for path in SWEEPS:
        for run in grid(load(path)):
            key = (run["dataset"], run["method"], run.get("w"), run.get("t"))
            assert key in PUBLISHED, (path.name, key)


def test_seeds_form_one_row_with_mean_and_spread_and_the_papers_figures(tmp_path):
    for seed, r1 in ((0, 64.0), (1, 66.0)):
        write_run(tmp_path / f"maskcon-{seed}", "cifar100", "maskcon", seed, {"R@1": r1, "R@2": 70.0, "R@5": 80.0,
                                                                               "R@10": 90.0})
    write_run(tmp_path / "selfcon-0", "cifar100", "selfcon", 0, {"R@1": 40.0, "R@2": 50.0, "R@5": 60.0, "R@10": 70.0},
              w=0.3, t=0.2)   # w and tau do not enter SelfCon's row
    write_run(tmp_path / "unfinished", "cifar100", "maskcon", 2, None)
    skipped = []
    rows = group(read_run_folders([tmp_path], log=skipped.append))
    assert len(skipped) == 1 and "unfinished" in skipped[0]
    text = markdown(rows)
    assert "| MaskCon | 1 | 0.05 | 2 | 65.00 ± 1.41 | 70.00 ± 0.00 | 80.00 ± 0.00 | 90.00 ± 0.00 | 65.52 | 74.46 |" in text
    assert "| SelfCon | – | – | 1 | 40.00 | 50.00 | 60.00 | 70.00 | 40.50 |" in text   # –: does not apply
    assert "(supplement Table 4)" in text


def test_a_seed_given_twice_counts_once_and_the_report_still_comes(tmp_path):
    """The quick start run twice: both runs have seed 0. The row keeps the first and names the other."""
    write_run(tmp_path / "runs" / "a", "cifar100", "maskcon", 0, {"R@1": 10.0})
    write_run(tmp_path / "runs" / "b", "cifar100", "maskcon", 0, {"R@1": 30.0})
    done = report(str(tmp_path / "runs"), "--out", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    assert f"{tmp_path / 'runs' / 'b'}: the same options and seed 0 as {tmp_path / 'runs' / 'a'}" in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("(1 run in 1 row)")
    assert "10.0" in (tmp_path / "report" / "report.md").read_text()


def test_the_door_reports_a_folder_without_runs_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "launch/report.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "holds no run" in out.stderr


def test_the_recall_plot_carries_its_title_and_a_legend_that_names_the_dashed_curves(tmp_path):
    from PIL import Image

    from maskcon.report import plot

    for seed in (0, 1):
        write_run(tmp_path / f"run-{seed}", "cifar100", "maskcon", seed,
                  {"R@1": 64.0 + seed, "R@2": 70.0, "R@5": 80.0, "R@10": 90.0})
    plot(group(read_run_folders([tmp_path])), tmp_path / "recall.png")
    texts = Image.open(tmp_path / "recall.png").text
    assert texts["Title"].startswith("Recall@K on the test split")
    legend = texts["Description"].split("; ")
    assert "dashed: the supplement's figures" in legend and any(entry.startswith("MaskCon") for entry in legend)


def test_a_smoke_run_a_stopped_run_and_another_recipe_stay_out_of_the_recipes_row_each_named(tmp_path):
    from maskcon.config import parse_config

    recipe = {name: value for name, value in vars(parse_config(["--dataset", "cifar100"], processes=1)).items()}
    recall = {"R@1": 65.0, "R@2": 74.0, "R@5": 83.0, "R@10": 89.0}

    def full_run(name: str, seed: int, **changes) -> Path:
        folder = write_run(tmp_path / name, "cifar100", "maskcon", seed, recall)
        (folder / "config.yaml").write_text(yaml.safe_dump({**recipe, "seed": seed, "global_batch": 128, **changes}))
        return folder

    full_run("full-0", 0)
    full_run("full-1", 1)
    full_run("torch", 5, loader="torch")   # the recipe computed another way: a row of its own, labelled
    full_run("smoke", 2, max_steps=5, epochs=1, global_batch=32)
    full_run("other", 3, lr=0.05)
    write_run(tmp_path / "stopped", "cifar100", "maskcon", 4, None)  # stopped by a signal: no results.json
    named = []
    rows = group(read_run_folders([tmp_path], log=named.append), log=named.append)
    assert [(row.variant, row.detail, row.seeds) for row in rows] == [("", "loader dali", [0, 1]),
                                                                        ("", "loader torch", [5])]
    assert rows[0].published() and "| MaskCon [loader torch] | 1 | 0.05 | 1 |" in markdown(rows)
    assert len(named) == 3 and [name for name in ("smoke", "other", "stopped")
                                if sum(f"/{name}:" in line for line in named) == 1] == ["smoke", "other", "stopped"]
    everything = group(read_run_folders([tmp_path], log=lambda line: None), everything=True)
    variants = {row.variant: row for row in everything}
    assert set(variants) == {"", "global_batch 32, epochs 1, max_steps 5", "lr 0.05"}
    assert variants["lr 0.05"].seeds == [3] and variants["lr 0.05"].published() is None


def test_the_report_counts_the_runs_its_rows_hold(tmp_path, capsys):
    from maskcon.report import main

    recall = {"R@1": 65.0, "R@2": 74.0, "R@5": 83.0, "R@10": 89.0}
    write_run(tmp_path / "runs" / "done", "cifar100", "maskcon", 0, recall)
    write_run(tmp_path / "runs" / "stopped", "cifar100", "maskcon", 1, None)    # left out: no results.json
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("(1 run in 1 row)"), last
    write_run(tmp_path / "runs" / "again", "cifar100", "maskcon", 2, recall)
    other = write_run(tmp_path / "runs" / "other-lr", "cifar100", "maskcon", 3, recall)   # finished, left out:
    config = yaml.safe_load((other / "config.yaml").read_text())                         # not the paper's recipe
    (other / "config.yaml").write_text(yaml.safe_dump({**config, "lr": 0.05}))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    said = capsys.readouterr().err.strip().splitlines()
    assert any("other-lr" in line for line in said) and said[-1].endswith("(2 runs in 1 row)"), said
    assert (tmp_path / "report" / "report.md").read_text().endswith("|\n")


def test_runs_on_two_folder_datasets_are_two_tables_and_a_seed_given_twice_counts_once_naming_both_runs(tmp_path):

    recall = {"R@1": 50.0, "R@2": 60.0, "R@5": 70.0, "R@10": 80.0}
    for name, shards in (("pets", "shards/pets"), ("birds", "shards/birds")):
        folder = write_run(tmp_path / "runs" / name, "folder", "maskcon", 0, recall)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        (folder / "config.yaml").write_text(yaml.safe_dump({**config, "shards": shards}))
    rows = group(read_run_folders([tmp_path / "runs"], log=lambda line: None))
    assert sorted(row.dataset for row in rows) == ["folder shards/birds", "folder shards/pets"]
    assert "### folder shards/birds" in markdown(rows) and "### folder shards/pets" in markdown(rows)
    # no row has a figure of the paper: no column of them, all –
    assert "| Method | w | τ | seeds | R@1 | R@2 | R@5 | R@10 |\n" in markdown(rows)
    assert "| MaskCon | 1 | 0.05 | 1 | 50.00 | 60.00 | 70.00 | 80.00 |\n" in markdown(rows)
    again = write_run(tmp_path / "again", "folder", "maskcon", 0, recall)
    (again / "config.yaml").write_text((tmp_path / "runs" / "pets" / "config.yaml").read_text())
    said = []
    rows = group(read_run_folders([tmp_path / "runs", again], log=lambda line: None), log=said.append)
    pets = [row for row in rows if row.dataset == "folder shards/pets"]
    assert len(pets) == 1 and pets[0].seeds == [0]
    assert len(said) == 1 and said[0].startswith(f"{tmp_path / 'again'}: the same options and seed 0 as "
                                                 f"{tmp_path / 'runs' / 'pets'}") and "left out" in said[0]


def test_a_whole_number_typed_as_a_float_and_a_max_steps_never_reached_pool_with_the_recipes_runs(tmp_path):
    """warmup_epochs 1 (the preset's) and 1.0 (from YAML or typed) are one option; --max-steps 30 on a run of 22
    steps finished its epochs all the same. A run that --max-steps did cut is a row of its own."""
    recall = {"R@1": 50.0, "R@2": 60.0}
    for seed, extra, stopped in ((0, {"warmup_epochs": 1}, "finished"), (1, {"warmup_epochs": 1.0}, "finished"),
                                 (2, {"warmup_epochs": 1, "max_steps": 30}, "finished"),
                                 (3, {"warmup_epochs": 1, "max_steps": 10}, "max_steps")):
        folder = write_run(tmp_path / "runs" / f"s{seed}", "digits", "maskcon", seed, recall)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        (folder / "config.yaml").write_text(yaml.safe_dump({**config, **extra}))
        (folder / "results.json").write_text(json.dumps({"step": 22, "stopped": stopped, **recall}))
    rows = group(read_run_folders([tmp_path / "runs"], log=lambda line: None), everything=True)
    assert sorted(sorted(row.seeds) for row in rows) == [[0, 1, 2], [3]]
    assert "max_steps 10" in next(row for row in rows if row.seeds == [3]).variant


RECALL = {"R@1": 65.0, "R@2": 74.0, "R@5": 83.0, "R@10": 89.0, "R@50": 95.0, "R@100": 97.0}


def report(*args: str, cwd: Path = ROOT, **run) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "report.py"), *args], cwd=cwd, capture_output=True,
                          text=True, **run)


def test_the_points_of_a_grid_sweep_are_found_below_the_runs_folder_and_their_own_subfolders_are_not(tmp_path):
    from maskcon.grid import GRID_FILE, point_name, points, read_sweep

    sweep = read_sweep(ROOT / "launch" / "sweeps" / "cifar100-main.yaml")
    sweep_runs = tmp_path / "runs" / sweep["name"]          # where `launch/grid.py` puts them: runs/SWEEP/POINT
    chosen = [point for point in points(sweep) if point["method"] in ("maskcon", "selfcon") and point["seed"] < 3]
    for point in chosen:
        finished = point["seed"] < 2
        folder = write_run(sweep_runs / point_name(point, sweep), point["dataset"], point["method"], point["seed"],
                           RECALL if finished else None)
        (folder / "checkpoints" / "step-00000010").mkdir(parents=True)
        wandb_files = folder / "wandb" / "offline-run-20250101_000000-abc" / "files"   # W&B's own config.yaml
        wandb_files.mkdir(parents=True)
        (wandb_files / "config.yaml").write_text(yaml.safe_dump({"dataset": {"value": point["dataset"]}}))
    (sweep_runs / GRID_FILE).write_text(yaml.safe_dump({"sweep": "cifar100-main.yaml", "options": []}))
    write_run(tmp_path / "runs" / "alone", "cifar100", "maskcon", 7, RECALL)   # a run of its own beside the sweep
    named = []
    rows = group(read_run_folders([tmp_path / "runs"], log=named.append))
    assert [(row.method, sorted(row.seeds)) for row in rows] == [("maskcon", [0, 1, 7]), ("selfcon", [0, 1])]
    assert sorted(line.split(":")[0] for line in named) == [
        str(sweep_runs / "method-maskcon_seed-2"), str(sweep_runs / "method-selfcon_seed-2")]
    assert all("unfinished" in line and "left out" in line for line in named)
    assert {row.method: sorted(row.seeds) for row in group(read_run_folders([sweep_runs], log=named.append))} == {
        "maskcon": [0, 1], "selfcon": [0, 1]}


def test_a_run_with_a_damaged_file_is_left_out_and_named_and_the_others_are_reported(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "good", "cifar100", "maskcon", 0, RECALL)
    cut = write_run(runs / "cut", "cifar100", "maskcon", 1, RECALL)
    (cut / "results.json").write_text((cut / "results.json").read_text()[:20])      # cut short
    broken = write_run(runs / "broken", "cifar100", "maskcon", 2, RECALL)
    (broken / "config.yaml").write_text("dataset: cifar100\nmethod: [maskcon\nseed: 2\n")   # not YAML
    for seed, results in enumerate(({}, {"R@1": "abc", "R@2": 5.0}, {"R@2": 5.0}), 3):      # JSON, but no figures
        write_run(runs / f"empty-{seed}", "cifar100", "maskcon", seed, results)
    out = report(str(runs), "--out", str(tmp_path / "report"))
    assert out.returncode == 0, out.stderr
    said = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and said[-1].endswith("(1 run in 1 row)")
    left_out = [line for line in said if line.endswith("; left out")]
    assert len(left_out) == 5 and left_out[0].startswith(f"{broken}/config.yaml is damaged (")
    assert left_out[1].startswith(f"{cut}/results.json is damaged (")
    assert left_out[2:] == [f"{runs / f'empty-{seed}'}: its results hold no Recall@K figures (R@1 missing, or a "
                            f"figure not a number); left out" for seed in (3, 4, 5)]


@pytest.mark.slow
def test_an_out_that_is_a_file_or_cannot_be_made_is_one_line_and_nothing_is_written(tmp_path):
    write_run(tmp_path / "runs" / "good", "cifar100", "maskcon", 0, RECALL)
    (tmp_path / "notes.md").write_text("mine\n")
    for out_folder, said in (("notes.md", "notes.md is a file"), ("notes.md/report", "notes.md is a file"),
                             ("/proc/x", "cannot write the report into /proc/x")):
        out = report(str(tmp_path / "runs"), "--out", out_folder, cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and said in out.stderr, (out_folder, out.stderr)
        assert out.stderr.startswith("error: ") and out.stdout == ""
    assert (tmp_path / "notes.md").read_text() == "mine\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.md", "runs"]


@pytest.mark.slow
def test_a_report_that_cannot_be_written_whole_leaves_the_earlier_one_and_no_partial_file(tmp_path):
    import resource

    write_run(tmp_path / "runs" / "good", "cifar100", "maskcon", 0, RECALL)
    small = 8192   # bytes a file may have: report.md and report.csv fit, recall.png does not (a disk filling up)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (small, small))  # noqa: E731
    for out_folder in (tmp_path / "new" / "report", tmp_path / "earlier"):
        out = report(str(tmp_path / "runs"), "--out", str(out_folder), preexec_fn=limit)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith(f"error: cannot write the report into {out_folder} (File too large)")
        if out_folder.name == "report":
            assert not (tmp_path / "new").exists()   # the folders it made for the report are gone again
            out_folder.mkdir(parents=True)
            (tmp_path / "earlier").mkdir()
            (tmp_path / "earlier" / "report.md").write_text("the earlier report\n")
    assert [path.name for path in (tmp_path / "earlier").iterdir()] == ["report.md"]
    assert (tmp_path / "earlier" / "report.md").read_text() == "the earlier report\n"
    assert report(str(tmp_path / "runs"), "--out", str(tmp_path / "earlier")).returncode == 0
    assert sorted(path.name for path in (tmp_path / "earlier").iterdir()) == ["recall.png", "report.csv", "report.md"]


def test_wandb_without_a_login_is_one_line(tmp_path):
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("WANDB_") and name not in ("NETRC", "HOME")}
    out = report("--wandb", "entity/maskcon/abc123", env={**env, "HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: --wandb entity/maskcon/abc123: W&B cannot be read") and "log in" in out.stderr


def test_the_plot_labels_k_by_its_values_and_leaves_out_w_and_tau_a_method_ignores(tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image

    from maskcon.report import plot, recall_figure

    write_run(tmp_path / "maskcon", "cifar100", "maskcon", 0, RECALL)
    write_run(tmp_path / "selfcon", "cifar100", "selfcon", 0, RECALL)
    write_run(tmp_path / "grafit", "cifar100", "grafit", 0, RECALL, w=0.5)
    rows = group(read_run_folders([tmp_path]))
    figure = recall_figure(rows)
    figure.canvas.draw()
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()] == ["1", "2", "5", "10", "50", "100"]
    plt.close(figure)
    plot(rows, tmp_path / "recall.png")
    legend = Image.open(tmp_path / "recall.png").text["Description"].split("; ")
    assert sorted(legend) == ["Grafit w 0.5 (n=1)", "MaskCon w 1 τ 0.05 (n=1)", "SelfCon (n=1)",
                              "dashed: the supplement's figures"]


def test_a_run_of_a_dataset_without_a_table_is_named_against_its_preset_not_the_paper(tmp_path):
    for dataset in ("folder", "cifar100"):
        folder = write_run(tmp_path / dataset, dataset, "maskcon", 0, RECALL)
        options = yaml.safe_load((folder / "config.yaml").read_text())
        (folder / "config.yaml").write_text(yaml.safe_dump({**options, "epochs": 1}))
    lines = []
    assert group(read_run_folders([tmp_path], log=lines.append), log=lines.append) == []
    assert sorted(line.split(": ", 1)[1].split(" (")[0] for line in lines) == [
        "not a full run of the folder preset", "not a full run of the paper's recipe"]


def test_long_legends_stay_inside_the_picture_and_off_the_other_panels(tmp_path):
    """Rows told apart by many options have long labels; two datasets make two panels side by side."""
    import matplotlib.pyplot as plt

    from maskcon.report import recall_figure

    for dataset in ("cifar100", "cars196"):
        for index, method in enumerate(("maskcon", "selfcon", "maskcon")):
            folder = write_run(tmp_path / f"{dataset}-{index}", dataset, method, 0,
                               {"R@1": 100.0, "R@2": 100.0, "R@5": 100.0, "R@10": 100.0})
            options = yaml.safe_load((folder / "config.yaml").read_text())
            options.update(image_size=32 + index, lr=0.02 * (index + 1), warmup_epochs=index,
                           pretrained=None if index else "imagenet",
                           weight_decay=index, momentum=0.1 * index, loader=("dali", "torch")[index % 2])
            (folder / "config.yaml").write_text(yaml.safe_dump(options))
    figure = recall_figure(group(read_run_folders([tmp_path], log=lambda line: None), everything=True))
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    picture = figure.get_tightbbox(renderer)         # what savefig(bbox_inches="tight") keeps, in inches
    try:
        labels = [text.get_text() for axis in figure.axes for text in axis.get_legend().get_texts()]
        assert any("pretrained none" in label for label in labels) and not any("None" in label for label in labels)
        for axis in figure.axes:
            legend = axis.get_legend().get_window_extent(renderer)
            assert picture.x0 * figure.dpi <= legend.x0 and legend.x1 <= picture.x1 * figure.dpi
            for other in figure.axes:
                assert not legend.overlaps(other.get_window_extent(renderer)), (axis.get_title(), other.get_title())
            assert axis.get_ylim()[1] <= 101          # every recall is 100 %: the axis ends near 100, not at 104
    finally:
        plt.close(figure)


def test_all_leaves_out_a_run_stopped_by_a_signal_as_the_help_says(tmp_path):
    from maskcon.report import build_parser, main

    help_text = " ".join(build_parser().format_help().split())
    assert "stopped by a signal" in help_text and "stopped early by --max-steps" in help_text
    assert "a stop signal" not in help_text
    write_run(tmp_path / "runs" / "done", "cifar100", "maskcon", 0, RECALL)
    stopped = write_run(tmp_path / "runs" / "stopped", "cifar100", "maskcon", 1, None)  # no results.json
    (stopped / "checkpoints" / "step-00000010").mkdir(parents=True)
    named = []
    rows = group(read_run_folders([tmp_path / "runs"], log=named.append), everything=True)
    assert [row.seeds for row in rows] == [[0]] and named == [f"{stopped}: no results.json (unfinished); left out"]
    assert main([str(tmp_path / "runs"), "--all", "--out", str(tmp_path / "report")]) == 0


def test_ctrl_c_while_the_report_loads_is_one_line_and_writes_nothing(tmp_path):
    from tests.conftest import stop_while_loading

    (tmp_path / "runs").mkdir()
    status, out, err = stop_while_loading(["launch/report.py", str(tmp_path / "runs"), "--out", str(tmp_path / "r")])
    assert status == 130 and err.strip().splitlines() == [
        "stopped by SIGINT: the report wrote nothing; run the same command again"], err
    assert not (tmp_path / "r").exists()
