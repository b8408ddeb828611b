import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from maskcon.config import FIELDS, build_parser, parse_config, resolved_defaults
from maskcon.datasets import DATASETS, readme_table
from maskcon.errors import UserError
from maskcon.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_presets_follow_the_supplement():
    cifar = parse_config(["--dataset", "cifar100"])
    assert (cifar.lr, cifar.momentum, cifar.weight_decay, cifar.batch_size, cifar.epochs) == (0.02, 0.9, 5e-4, 128, 200)
    assert (cifar.queue_size, cifar.t0, cifar.proj_dim, cifar.proj_hidden, cifar.warmup_epochs) == (8192, 0.1, 128, 512, 5)
    assert (cifar.w, cifar.t) == (1.0, 0.05)
    imagenet = parse_config(["--dataset", "imagenet32"])
    assert (imagenet.epochs, imagenet.batch_size, imagenet.queue_size) == (100, 256, 16384)
    assert (parse_config(["--dataset", "sop_split1"]).w, parse_config(["--dataset", "sop_split1"]).t) == (0.8, 0.1)
    assert (parse_config(["--dataset", "sop_split2"]).w, parse_config(["--dataset", "sop_split2"]).t) == (0.5, 0.05)
    assert (parse_config(["--dataset", "cars196"]).w, parse_config(["--dataset", "cars196"]).t) == (1.0, 0.1)
    assert parse_config(["--dataset", "sop_split2", "--method", "coins"]).w == 0.2
    # CIFAR: the best w of supplement Tables 4 and 6 (bold rows)
    assert parse_config(["--dataset", "cifar100", "--method", "grafit"]).w == 0.8
    assert parse_config(["--dataset", "cifar100", "--method", "coins"]).w == 0.5
    assert parse_config(["--dataset", "cifartoy_good", "--method", "grafit"]).w == 0.5
    assert parse_config(["--dataset", "cifartoy_bad", "--method", "coins"]).w == 0.8
    assert parse_config(["--dataset", "cars196", "--method", "grafit", "--w", "0.3"]).w == 0.3   # the CLI wins


def test_paper_datasets_start_from_imagenet_weights_and_digits_from_random():
    for name in DATASETS:
        expected = None if name == "digits" else "imagenet"
        assert parse_config(["--dataset", name]).pretrained == expected
    assert parse_config(["--dataset", "cifar100", "--pretrained", "none"]).pretrained is None
    assert parse_config(["--dataset", "cifar100", "--pretrained", "w.pth"]).pretrained == "w.pth"


def test_datasets_and_methods_each_come_from_their_one_description():
    """The CLI's choices, the presets, the recipes and README's table all read maskcon.datasets.DATASETS."""
    from maskcon.datasets import recipe_for

    for name, description in DATASETS.items():
        config = parse_config(["--dataset", name])
        assert config.image_size == description.image_size
        for option, value in description.preset.items():
            assert getattr(config, option) == value
        recipe_for(name)
    assert readme_table() in (ROOT / "README.md").read_text()
    help_text = build_parser().format_help()
    assert all(name in help_text for name in [*DATASETS, *METHODS])


def test_command_line_wins_in_both_spellings(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("batch_size: 64\nt: 0.2\nchannels-last: true\n")
    config = parse_config(["--dataset=cifar100", f"--config={yaml_file}", "--t=0.5", "--queue_size=100",
                           "--compile=False", "--output-dir", "x"])
    assert (config.batch_size, config.t, config.queue_size, config.channels_last, config.compile) == (64, 0.5, 100, True, False)
    assert config.output_dir == "x"


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "mnist"], "known datasets: digits"),
    (["--method", "simclr"], "known methods: maskcon"),
    (["--w", "1.5"], "[0, 1]"),
    (["--t", "0"], "temperature"),
    (["--t0=-1"], "temperature"),
    (["--t", "inf"], "temperature --t must be a positive number"),     # every similarity divided away
    (["--t0", "nan"], "temperature --t0 must be a positive number"),
    (["--batch-size", "0"], "at least 1"),
    (["--image-size", "1"], "--image-size must be 8 to 1024 px"),
    (["--image-size", "7"], "--image-size must be 8 to 1024 px"),
    (["--image-size", "100000"], "--image-size must be 8 to 1024 px"),   # an allocation of 960 GB
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--momentum", "1"], "--momentum must lie in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0"),
    (["--seed", "-1"], "--seed must lie in 0 to 2**32 - 1"),
    (["--seed", str(2**32)], "--seed must lie in 0 to 2**32 - 1"),
    (["--epochs", "many"], "invalid"),
    (["--accept-changes", "epochs"], "only applies with --resume"),
    (["--compile-mode", "default"], "only applies with --compile"),
    (["--global-batch", "64", "--batch-size", "32"], "give one of them"),
    (["--check", "--print-config"], "give one of them"),
])
def test_impossible_options_are_one_line_errors(argv, words):
    with pytest.raises(UserError) as err:
        parse_config(argv)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_help_documents_every_option_once_in_its_group_with_one_default():
    out = subprocess.run([sys.executable, "launch/train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for name in FIELDS:
        assert len(re.findall(rf"^  --{name.replace('_', '-')}(?=[ \n])", out.stdout, re.MULTILINE)) == 1, name
        assert f"--{name} " not in out.stdout or "_" not in name, name     # the sweeps' spelling: accepted, not shown
    for group in ("data and loader:", "method:", "network:", "optimisation and schedule:",
                  "evaluation, logging and checkpoints:", "the run:"):
        assert f"\n{group}\n" in out.stdout
    assert out.stdout.count("(default:") == len(FIELDS) and "maskcon." not in out.stdout


def test_bad_option_from_the_door_is_one_line_without_traceback():
    out = subprocess.run([sys.executable, "launch/train.py", "--dataset", "mnist"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith("error: unknown dataset 'mnist'")


def test_help_shows_the_preset_of_the_dataset_and_method_asked_for():
    def shown(argv, flag, door=False):
        if door:          # the help that launch/train.py prints
            out = subprocess.run([sys.executable, "launch/train.py", *argv, "--help"], cwd=ROOT, capture_output=True,
                                 text=True)
            assert out.returncode == 0, out.stderr
            text = out.stdout
        else:             # the same, built in this process as parse_config builds it for --help
            text = build_parser(resolved_defaults([*argv, "--help"])).format_help()
        entry = text.split(f"  {flag} ", 1)[1].split("\n  --", 1)[0]
        assert entry.count("(default:") == 1, entry            # printed once
        return " ".join(entry.split()).rsplit("(default: ", 1)[1].rstrip(")")

    assert shown([], "--epochs") == "12"                       # the bundled digits' preset
    assert shown(["--dataset", "imagenet32"], "--epochs") == "100"
    assert shown(["--dataset=imagenet32"], "--batch-size", door=True) == "256"
    assert shown(["--dataset", "sop_split2", "--method", "coins"], "--w") == "0.2"    # supplement Table 1
    assert shown(["--dataset", "cars196"], "--image-size") == "224"


@pytest.mark.parametrize("processes, per_process", [(1, 128), (2, 64), (4, 32), (8, 16)])
def test_global_batch_is_split_over_the_processes(processes, per_process):
    config = parse_config(["--dataset", "cifar100", "--global-batch", "128"], processes=processes)
    assert (config.batch_size, config.global_batch) == (per_process, 128)


def test_without_global_batch_the_batch_is_per_process():
    config = parse_config(["--dataset", "cifar100"], processes=4)
    assert (config.batch_size, config.global_batch) == (128, 512)


def test_a_global_batch_that_does_not_split_is_refused():
    with pytest.raises(UserError, match="does not split evenly over 3"):
        parse_config(["--dataset", "cifar100", "--global-batch", "128"], processes=3)


def test_a_sweep_run_that_would_change_the_recipes_batch_is_refused(monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    assert parse_config(["--dataset", "cifar100"], processes=1).global_batch == 128
    with pytest.raises(UserError, match="not the recipe's 128"):
        parse_config(["--dataset", "cifar100"], processes=2)
    assert parse_config(["--dataset", "cifar100", "--global_batch=128"], processes=2).batch_size == 64


def test_print_config_resolves_the_batch_and_lr_for_the_processes_of_the_launch():
    out = subprocess.run([sys.executable, "launch/train.py", "--dataset", "cifar100", "--global-batch", "128",
                          "--print-config"], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "4"})
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert (resolved["num_processes"], resolved["batch_size"], resolved["global_batch"]) == (4, 32, 128)
    assert resolved["base_lr"] == pytest.approx(0.02) and resolved["dataset"] == "cifar100"


def test_check_names_missing_shards_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "launch/train.py", "--dataset", "cifar100", "--shards", str(tmp_path),
                          "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "make_shards.py create" in out.stderr


def test_an_abbreviated_option_is_refused_in_one_line():
    from maskcon.config import parse_config
    from maskcon.errors import UserError

    with pytest.raises(UserError, match="--lr-ref") as caught:
        parse_config(["--lr-ref", "64"])
    assert "\n" not in str(caught.value)
    assert parse_config(["--lr-reference-batch", "64"]).lr_reference_batch == 64


@pytest.mark.parametrize("processes", [1, 2])
def test_print_config_output_given_back_as_config_resolves_to_the_same_run(tmp_path, processes):
    from maskcon.plan import plan_run

    def printed(argv: list[str]) -> dict:
        resolved = plan_run(parse_config(argv, processes=processes), processes, shards_required=False).resolved()
        resolved.pop("provenance")
        return resolved

    first = printed(["--dataset", "cifar100", "--global-batch", "128", "--lr", "0.03", "--epochs", "7",
                     "--output-dir", str(tmp_path / "run")])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**first, "provenance": {"commit": "abc"}}))
    again = printed(["--config", str(tmp_path / "config.yaml")])
    assert again == {**first, "config": str(tmp_path / "config.yaml")}
    assert (again["batch_size"], again["global_batch"], again["base_lr"]) == (128 // processes, 128, 0.03)
    # the command line still wins, over both of the file's batch options and the rate they gave
    changed = printed(["--config", str(tmp_path / "config.yaml"), "--batch-size", "32", "--lr", "0.04"])
    assert (changed["batch_size"], changed["global_batch"]) == (32, 32 * processes)
    assert changed["base_lr"] == pytest.approx(0.04 * 32 * processes / 128)


def test_the_record_of_a_resumed_start_starts_the_same_run_anew(tmp_path):
    """--resume and --accept-changes belong to one start of a run: config.yaml leaves them out, so that the
    file of a resumed run, given back with another --output-dir, starts that run afresh."""
    from maskcon.plan import plan_run

    argv = ["--dataset", "cifar100", "--epochs", "7", "--output-dir", str(tmp_path / "run"), "--resume", "auto",
            "--accept-changes", "epochs"]
    resolved = plan_run(parse_config(argv), 1, shards_required=False).resolved()
    assert "resume" not in resolved and "accept_changes" not in resolved and resolved["epochs"] == 7
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(resolved))
    again = parse_config(["--config", str(tmp_path / "config.yaml"), "--output-dir", str(tmp_path / "new")])
    assert (again.resume, again.accept_changes, again.epochs) == (None, None, 7)


def test_a_recorded_learning_rate_that_no_longer_follows_from_the_file_is_one_line(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"dataset": "cifar100", "lr": 0.05, "global_batch": 128,
                                                          "num_processes": 1, "base_lr": 0.02}))
    with pytest.raises(UserError, match="base_lr 0.02 does not follow from its options") as caught:
        parse_config(["--config", str(tmp_path / "config.yaml")], processes=1)
    assert "\n" not in str(caught.value)
    assert parse_config(["--config", str(tmp_path / "config.yaml")], processes=2).global_batch == 128


def test_check_refuses_imagenet_weights_it_cannot_reach_and_passes_cached_ones(digits_shards, tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), HTTPS_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", WANDB_MODE="disabled")   # a proxy that refuses: no network
    command = [sys.executable, "launch/train.py", "--check", "--shards", str(digits_shards), "--pretrained", "imagenet"]
    refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    line = refused.stderr.strip()
    assert "\n" not in line and line.startswith("error: cannot download torchvision's resnet18 ImageNet weights")
    run = [arg for arg in command if arg != "--check"] + ["--epochs", "1", "--output-dir", str(tmp_path / "run")]
    ran = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 2 and ran.stderr.strip().splitlines()[-1] == line, ran.stderr   # the run says the same
    assert not (tmp_path / "run").exists()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(b"weights fetched before")
    passed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert passed.returncode == 0 and "check passed" in passed.stdout, passed.stderr


def test_a_config_file_of_another_dataset_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"dataset": "cifar100", "image_size": 32, "epochs": 200}))
    with pytest.raises(UserError, match="is of a cifar100 run: --dataset digits would train digits with its image "
                                        "size") as caught:
        parse_config(["--config", str(tmp_path / "config.yaml"), "--dataset", "digits"], processes=1)
    assert "\n" not in str(caught.value)
    same = parse_config(["--config", str(tmp_path / "config.yaml"), "--dataset", "cifar100"], processes=1)
    assert (same.dataset, same.epochs) == ("cifar100", 200)
