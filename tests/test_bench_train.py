"""`python launch/bench.py train`: runs its three modes on shards and reports images/s and data wait."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskcon import shards
from maskcon.loaders.reference import official_style_loader
from maskcon.datasets.synthetic import write_synthetic_imagenet32

ROOT = Path(__file__).resolve().parents[1]


def test_official_style_loader_gives_two_views_with_their_labels(tmp_path):
    folder = write_synthetic_imagenet32(tmp_path / "shards", num_train=64, num_test=16)
    manifest = shards.read_manifest(folder)
    assert manifest["dataset"] == "imagenet32" and manifest["splits"]["train"]["num_samples"] == 64
    loader = official_style_loader(folder, recipe="imagenet32", image_size=32, batch_size=16, workers=1, seed=0,
                                   query_view="strong", key_view="weak", pin_memory=False)
    batches = list(loader)
    assert len(batches) == 4
    query, key, fine, coarse = batches[0]
    assert query.shape == key.shape == (16, 3, 32, 32)
    assert query.dtype == torch.float32 and fine.dtype == torch.int64
    assert torch.equal(coarse, torch.tensor(manifest["fine_to_coarse"])[fine])
    assert -3 < key.mean() < 3 and not torch.equal(query, key)
    seen = torch.cat([batch[2] for batch in batches])
    assert len(set(seen.tolist())) == 64  # synthetic fine label = position: every sample once per epoch


@pytest.mark.slow
def test_bench_reports_every_mode(tmp_path):
    folder = tmp_path / "digits"
    shards.create("digits", None, folder)
    out = subprocess.run([sys.executable, "launch/bench.py", "train", "--shards", str(folder), "--image-size", "8",
                          "--batch-size", "8", "--steps", "1", "--repeats", "2", "--warmup", "0", "--workers", "1",
                          "--device", "cpu", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["modes"]) == {"real", "synthetic", "official", "resume"}
    for mode in report["modes"].values():
        assert mode["images_per_s_min"] <= mode["images_per_s"] <= mode["images_per_s_max"]
        assert len(mode["windows"]) == 2 and 0 <= mode["data_wait"] < 1 and mode["data_ms_per_batch"] >= 0
    assert report["steps_per_epoch"] == 1437 // 8
    assert report["resume_first_step_s"] > 0 and report["epoch_first_step_s"] > 0
    assert report["skip_by_reading_s"] > 0 and report["real_step_s"] > 0
    assert report["mixed_precision"] == "no" and report["channels_last"] is False
    ratio = report["modes"]["real"]["images_per_s"] / report["modes"]["official"]["images_per_s"]
    assert abs(report["real_over_official"] - ratio) < 1e-9
    assert report["command"].startswith("python launch/bench.py train --shards")


def test_bench_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "launch/bench.py", "train", "--dataset", "cifar100", "--shards",
                          str(tmp_path / "none")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "make_shards.py create cifar100" in out.stderr


def test_a_report_as_text_shows_figures_spreads_and_tables():
    from maskcon.bench import text

    report = {"ratio": 1.23456, "paired": {"median": 4.0, "min": 0.5, "max": 10.0}, "inputs": {"N": 256},
              "spread": [4167.3, 18714.2],
              "modes": {"real": {"images_per_s": 12345.6, "data_wait": None}, "synthetic": {"images_per_s": 2.5}}}
    assert text(report).splitlines() == ["ratio: 1.235", "paired: 4 (0.5-10)", "inputs:", "  N: 256",
                                         "spread: 4,167; 18,714", "modes:",
                                         "           images_per_s  data_wait",
                                         "real             12,346          -",
                                         "synthetic           2.5          -"]
