"""The W&B sweeps of launch/sweeps/: supplement Tables 4-8 and the main comparison per dataset."""

import itertools
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from maskcon.config import FIELDS, parse_config
from maskcon.datasets import DATASETS
from maskcon.methods import METHODS
from maskcon.report import PUBLISHED

ROOT = Path(__file__).resolve().parents[1]
ALL_SWEEPS = sorted((ROOT / "launch" / "sweeps").glob("*.yaml"))
MAIN_SWEEPS = [path for path in ALL_SWEEPS if path.stem.endswith("-main")]
SWEEPS = [path for path in ALL_SWEEPS if path not in MAIN_SWEEPS]   # the supplement's tables
COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
# supplement section A: batch 128, ImageNet-1K (ImageNet32) 256
RECIPE_BATCH = {"imagenet32": 256}
PAPER_DATASETS = ["cifar100", "cifartoy_good", "cifartoy_bad", "imagenet32", "sop_split1", "sop_split2", "cars196"]

# file name prefix -> the supplement's table whose rows (dataset, method, w, tau) its sweep runs: the rows of
# maskcon.report.PUBLISHED, which tests/test_report.py checks against the supplement itself
TABLE_OF = {"cifar100": 4, "sop_split1": 5, "cifartoy": 6, "sop_split2": 7, "cars196": 8}
TABLES = {prefix: [key for key, (table, _) in PUBLISHED.items() if table == number]
          for prefix, number in TABLE_OF.items()}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def grid(sweep: dict) -> list[dict]:
    """The runs of a W&B grid sweep: the product of every parameter's `values` (or its single `value`)."""
    names = list(sweep["parameters"])
    choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in sweep["parameters"].values()]
    return [dict(zip(names, combination)) for combination in itertools.product(*choices)]


def agent_command(sweep: dict, run: dict) -> list[str]:
    """The command a W&B agent runs for one grid point (wandb_agent.Agent._command_run)."""
    sweep_vars = create_sweep_command_args({"args": {name: {"value": value} for name, value in run.items()}})
    sweep_vars.update(program=[sweep["program"]], env=["/usr/bin/env"], interpreter=["python"])
    tokens = []
    for chunk in map(str, sweep["command"]):
        if chunk.startswith("${") and chunk.endswith("}"):
            tokens += sweep_vars.get(chunk[2:-1]) or []
        else:
            tokens.append(chunk)
    return tokens


def test_there_is_a_sweep_per_table():
    assert SWEEPS, "launch/sweeps/ holds no sweep"
    prefixes = {path.name.split("-")[0] for path in SWEEPS}
    assert prefixes == set(TABLES)


@pytest.mark.parametrize("path", ALL_SWEEPS, ids=lambda p: p.name)
def test_sweep_file_is_a_grid_over_options_of_the_trainer(path):
    sweep = load(path)
    assert {"program", "method", "metric", "command", "parameters"} <= set(sweep)
    assert sweep["program"] == "launch/run.py" and (ROOT / sweep["program"]).is_file()
    assert sweep["method"] == "grid"
    assert sweep["metric"] == {"name": "R@1", "goal": "maximize"}
    assert sweep["command"] == COMMAND
    for name, spec in sweep["parameters"].items():
        assert name in FIELDS, f"{path.name}: {name} is not an option of launch/train.py"
        assert len(spec) == 1 and ("value" in spec or isinstance(spec.get("values"), list)), name


@pytest.mark.parametrize("path", ALL_SWEEPS, ids=lambda p: p.name)
def test_trainer_accepts_every_run_of_the_grid(path):
    sweep = load(path)
    for run in grid(sweep):
        tokens = agent_command(sweep, run)
        assert tokens[:3] == ["/usr/bin/env", "python", "launch/run.py"]
        assert tokens[3:] == [f"--{name}={value}" for name, value in run.items()]
        config = parse_config(tokens[3:])
        for name, value in run.items():
            assert getattr(config, name) == value, (path.name, name)


@pytest.mark.parametrize("path", ALL_SWEEPS, ids=lambda p: p.name)
@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_every_sweep_run_trains_the_recipes_global_batch_and_lr_on_any_number_of_gpus(path, processes):
    """The global batch is pinned to the supplement's (section A) and split over the processes, so the
    learning rate the run trains with is the recipe's 0.02 whatever the machine."""
    from maskcon.plan import plan_run

    for run in grid(load(path)):
        config = parse_config(agent_command(load(path), run)[3:], processes=processes)
        resolved = plan_run(config, processes, shards_required=False).resolved()
        assert resolved["global_batch"] == RECIPE_BATCH.get(run["dataset"], 128)
        assert resolved["batch_size"] * processes == resolved["global_batch"]
        assert resolved["base_lr"] == pytest.approx(0.02)


def test_main_comparison_runs_every_method_on_every_paper_dataset_at_its_preset():
    runs = [run for path in MAIN_SWEEPS for run in grid(load(path))]
    for dataset in PAPER_DATASETS:
        for method in METHODS:
            seeds = [run["seed"] for run in runs if run["dataset"] == dataset and run["method"] == method]
            assert len(seeds) >= 3 and len(set(seeds)) == len(seeds), (dataset, method)
    assert all("w" not in run and "t" not in run for run in runs)   # w and tau: the dataset's preset
    assert set(PAPER_DATASETS) <= set(DATASETS)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_grids_vary_only_what_their_methods_read(path):
    for run in grid(load(path)):
        method = METHODS[run["method"]]
        assert ("w" in run) == method.uses_w and ("t" in run) == method.uses_t, (path.name, run)


@pytest.mark.parametrize("prefix", TABLES)
def test_grids_are_the_rows_of_the_table(prefix):
    runs = [run for path in SWEEPS if path.name.split("-")[0] == prefix for run in grid(load(path))]
    rows = [(run["dataset"], run["method"], run.get("w"), run.get("t")) for run in runs]
    assert sorted(rows, key=str) == sorted(TABLES[prefix], key=str)
