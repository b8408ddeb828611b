"""From the launch commands to the run's files: real launches on the bundled digits.

Three real runs (one of two gloo processes started as a sweep agent starts it, two of one process) feed the
tests of the recipe's global batch, provenance, the console log, the report and the backbone.
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
COMMON = ["--max-steps", "2", "--epochs", "1", "--eval-untrained", "false"]

pytestmark = pytest.mark.slow


def run(argv: list[str], **environment) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "", **environment}
    env = {name: value for name, value in env.items() if value != ""}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "digits"
    done = run([sys.executable, "launch/make_shards.py", "create", "digits", "--out", str(folder)])
    assert done.returncode == 0, done.stderr
    return folder


@pytest.fixture(scope="module")
def runs(module_folder, shards) -> dict[str, Path]:
    """seed 0: launch/run.py on 2 processes with the sweep's pinned global batch, under a sweep agent's
    WANDB_SWEEP_ID; seeds 1 and 2: launch/train.py, one process (seed 1 with W&B offline)."""
    base = module_folder
    folders = {name: base / name for name in ("seed0", "seed1", "seed2")}
    two = run([sys.executable, "launch/run.py", "--processes", "2", "--global_batch=64", "--seed=0",
               "--wandb=disabled", f"--shards={shards}", f"--output-dir={folders['seed0']}", *COMMON],
              WANDB_SWEEP_ID="sweep0")
    assert two.returncode == 0, two.stderr[-3000:]
    for seed, wandb in ((1, "offline"), (2, "disabled")):
        one = run([sys.executable, "launch/train.py", "--seed", str(seed), "--wandb", wandb, "--shards", str(shards),
                   "--output-dir", str(folders[f"seed{seed}"]), *COMMON])
        assert one.returncode == 0, one.stderr[-3000:]
    return folders


def test_a_sweep_run_on_two_processes_trains_the_recipes_global_batch_and_lr(runs):
    resolved = yaml.safe_load((runs["seed0"] / "config.yaml").read_text())
    assert (resolved["num_processes"], resolved["global_batch"], resolved["batch_size"]) == (2, 64, 32)
    assert resolved["base_lr"] == pytest.approx(0.04 * 64 / 128)   # digits' preset: lr 0.04 for batch 128
    one_process = yaml.safe_load((runs["seed1"] / "config.yaml").read_text())
    assert (one_process["num_processes"], one_process["global_batch"], one_process["base_lr"]) == (
        1, 64, resolved["base_lr"])
    assert "2 processes x batch 32" in (runs["seed0"] / "console.log").read_text()


@pytest.mark.parametrize("argv, environment, words", [
    (["--global_batch=63"], {}, "does not split evenly over 2"),
    ([], {"WANDB_SWEEP_ID": "sweep0"}, "not the recipe's 64"),
])
def test_a_sweep_run_that_would_change_the_recipe_is_refused_before_any_process_starts(argv, environment, words):
    done = run([sys.executable, "launch/run.py", "--processes", "2", "--wandb=disabled", *argv], **environment)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and words in done.stderr


BAD_OPTIONS = [
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--w", "1.5"], "[0, 1]"),
    (["--epochs", "many"], "invalid"),
    (["--accept-changes", "epochs"], "only applies with --resume"),
    (["--compile-mode", "default"], "only applies with --compile"),
]
LAUNCH_FORMS = {
    "train.py": [sys.executable, "launch/train.py"],
    "run.py on 2 processes": [sys.executable, "launch/run.py", "--processes", "2"],
    "accelerate launch -q": [ACCELERATE, "launch", "-q", "--config_file", "launch/accelerate/one_process.yaml",
                             "launch/train.py"],
    "accelerate launch -q, 2 processes": [ACCELERATE, "launch", "-q", "--config_file",
                                          "launch/accelerate/one_node.yaml", "--num_processes", "2",
                                          "launch/train.py"],
}


@pytest.mark.parametrize("form", LAUNCH_FORMS)
@pytest.mark.parametrize("argv, words", BAD_OPTIONS, ids=lambda value: str(value))
def test_a_bad_option_is_one_line_under_every_documented_launch_form(form, argv, words):
    done = run([*LAUNCH_FORMS[form], *argv])
    assert done.returncode == (1 if form.startswith("accelerate") else 2)   # accelerate's own status
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if form == "accelerate launch -q, 2 processes":   # torchrun's report of the failed processes follows
        assert lines[0].startswith("error: ") and words in lines[0]
        assert sum(line.startswith("error: ") for line in lines) == 1
        return
    assert lines == [lines[0]] and lines[0].startswith("error: ") and words in lines[0], done.stderr


def test_the_quick_start_and_the_documented_launchers_print_no_launcher_warning():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("<!-- quickstart -->")[1].split("<!-- /quickstart -->")[0]
    assert ".venv/bin/python launch/train.py" in quick_start and "accelerate launch" not in quick_start
    for form in ("accelerate launch -q", "accelerate launch -q, 2 processes"):
        done = run([*LAUNCH_FORMS[form], "--print-config"])
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert yaml.safe_load(done.stdout)["num_processes"] == (2 if "2 processes" in form else 1)


def test_check_reads_shards_resume_and_wandb_without_training(runs, shards):
    done = run([sys.executable, "launch/train.py", "--check", "--shards", str(shards), "--resume", "--epochs", "1",
                "--output-dir", str(runs["seed2"]), "--seed", "2", "--wandb", "disabled", *COMMON[:2]])
    assert done.returncode == 0, done.stderr
    assert "intact" in done.stdout and "resume: from" in done.stdout and "W&B: disabled" in done.stdout
    changed = run([sys.executable, "launch/train.py", "--check", "--shards", str(shards), "--resume",
                   "--output-dir", str(runs["seed2"]), "--seed", "3", "--wandb", "disabled", *COMMON[:2]])
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1 and "seed (2 -> 3)" in changed.stderr


def test_provenance_in_config_yaml_and_in_wandbs_config(runs):
    import torch

    for folder in runs.values():
        provenance = yaml.safe_load((folder / "config.yaml").read_text())["provenance"]
        assert re.fullmatch(r"[0-9a-f]{40}", provenance["code"]["commit"])
        assert isinstance(provenance["code"]["clean"], bool)
        assert torch.__version__.split("+")[0] == provenance["libraries"]["torch"]
        assert {"accelerate", "wandb", "python"} <= set(provenance["libraries"])
        assert [name for name in provenance["libraries"] if name.startswith("nvidia-dali-cuda1")] == [
            next(d.metadata["Name"] for d in importlib.metadata.distributions()
                 if d.metadata["Name"].startswith("nvidia-dali-cuda1"))]   # the DALI wheel of this install
        assert provenance["machine"]["cuda"] == torch.version.cuda and "gpu" in provenance["machine"]
    # the offline run file holds the config record (protobuf) with the provenance as JSON text
    run_file = next((runs["seed1"] / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    commit = yaml.safe_load((runs["seed1"] / "config.yaml").read_text())["provenance"]["code"]["commit"]
    assert b"provenance" in run_file and f'"commit":"{commit}"'.encode() in run_file
    assert "training maskcon on digits" in next((runs["seed1"] / "wandb").glob("offline-run-*/files/console.log")).read_text()


def test_the_run_folder_holds_the_files_readme_lists(runs):
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Where things go")[1].split("W&B:")[0]
    names = re.findall(r"^\| `([^`]+)`", table, re.M)
    for name in names:
        if "STEP" in name or "step-N" in name:
            continue
        assert (runs["seed1"] / name.rstrip("/")).exists(), name
    log = (runs["seed1"] / "console.log").read_text()
    assert "training maskcon on digits" in log and "epoch 1 step 2: R@1" in log


def test_report_of_three_finished_runs_prints_the_table_and_writes_csv_and_png(runs, tmp_path):
    results = [json.loads((folder / "results.json").read_text()) for folder in runs.values()]
    report = [sys.executable, "launch/report.py", *map(str, runs.values()), "--out", str(tmp_path / "report")]
    smoke = run(report)     # 2 steps of 1 epoch: not the digits' recipe, each run named, no table
    assert smoke.returncode == 2 and smoke.stderr.count("not a full run of the digits preset") == 3, smoke.stderr
    done = run([*report, "--all"])
    assert done.returncode == 0, done.stderr
    recall_1 = [result["R@1"] for result in results]
    mean = sum(recall_1) / 3
    std = (sum((value - mean) ** 2 for value in recall_1) / 2) ** 0.5
    row = next(line for line in done.stdout.splitlines() if line.startswith("| MaskCon"))
    assert row.startswith("| MaskCon (epochs 1, max_steps 2) |")   # labelled by what differs from the recipe
    assert row.split(" | ")[1:5] == ["1", "0.05", "3", f"{mean:.2f} ± {std:.2f}"]
    assert row.count(" | ") == 7 and "paper" not in done.stdout   # the digits have no figures of the paper
    import csv

    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    assert len(rows) == 1 and rows[0]["seeds"] == "3"
    assert float(rows[0]["R@1_mean"]) == pytest.approx(mean, abs=1e-4)
    assert float(rows[0]["R@1_std"]) == pytest.approx(std, abs=1e-4)
    png = (tmp_path / "report" / "recall.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


FEATURES = '''
import json, sys
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
import maskcon
from maskcon.loaders import LoaderSpec, build_test_loader
from maskcon.model import MaskConModel
from maskcon.retrieval import recall_at_k
from maskcon.train import extract_features

run, shards = sys.argv[1], sys.argv[2]
encoder = maskcon.load_backbone(run)
meta = encoder.metadata
loader = build_test_loader(shards, LoaderSpec(image_size=meta["image_size"], batch_size=100))
features, fine = [], []
with torch.no_grad():
    for batch in loader:
        features.append(encoder(batch["image"]))
        fine.append(batch["fine"].long())
features, fine = torch.cat(features), torch.cat(fine)
config = __import__("yaml").safe_load(open(f"{run}/config.yaml"))
checkpoint = sorted(__import__("pathlib").Path(run, "checkpoints").iterdir())[-1]
model = MaskConModel(arch=config["arch"], image_size=config["image_size"], queue_size=config["queue_size"],
                     proj_hidden=config["proj_hidden"], proj_dim=config["proj_dim"])
model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
table = extract_features(model, loader, Accelerator(cpu=True))
print(json.dumps({"recall": recall_at_k(features, fine), "max_difference": (features - table["features"]).abs().max().item(),
                  "same_labels": bool((fine == table["fine"]).all()), "metadata": meta}))
'''


def test_load_backbone_in_a_fresh_process_gives_the_features_the_evaluation_used(runs, shards):
    done = run([sys.executable, "-c", FEATURES, str(runs["seed1"]), str(shards)])
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    results = json.loads((runs["seed1"] / "results.json").read_text())
    assert found["same_labels"] and found["max_difference"] < 1e-5
    for name, value in found["recall"].items():
        assert value == pytest.approx(results[name], abs=1e-9), name
    meta = found["metadata"]
    assert (meta["arch"], meta["image_size"], meta["dataset"], meta["method"]) == ("resnet18", 8, "digits", "maskcon")
    assert meta["recall_at_k"]["R@1"] == pytest.approx(results["R@1"])
    assert meta["stem"].startswith("conv3x3") and len(meta["normalisation"]["mean"]) == 3
    assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"])
    card = (runs["seed1"] / "MODEL_CARD.md").read_text()
    assert "maskcon.load_backbone" in card and f"R@1 {results['R@1']:.2f}" in card


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_gives_the_trainers_recall_of_the_same_weights_and_writes_the_features(runs, shards, tmp_path,
                                                                                  processes):
    folder = runs["seed1"]
    trained = json.loads((folder / "results.json").read_text())
    door = [sys.executable, "launch/eval.py"] if processes == 1 else \
        [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--main_process_port", "0", "--dynamo_backend", "no", "launch/eval.py"]
    for network in (folder, folder / "backbone.pt", sorted((folder / "checkpoints").glob("step-*"))[-1]):
        done = run([*door, str(network), "--shards", str(shards), "--json", "--features", str(tmp_path / "f.pt")])
        assert done.returncode == 0, done.stderr[-3000:]
        recall = json.loads(done.stdout.strip().splitlines()[-1])
        assert recall == {name: trained[name] for name in recall} and "R@1" in recall, network
    import torch

    written = torch.load(tmp_path / "f.pt")
    assert written["features"].shape == (360, 512) and len(written["keys"]) == 360
    assert written["index"].tolist() == list(range(360)) and written["fine"].shape == (360,)


def test_processes_and_an_accelerate_config_together_are_refused_in_one_line():
    done = subprocess.run([sys.executable, "launch/run.py", "--processes", "2", "--accelerate-config",
                           "launch/accelerate/gpu_8.yaml", "--check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: --processes 2 and --accelerate-config launch/accelerate/gpu_8.yaml both set the processes; give one "
        "of them"), done.stderr
