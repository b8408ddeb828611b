"""The one GPU command (`python launch/bench.py gpu`): its parts, its one-line failures and its block."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from maskcon.bench import gpu
from maskcon.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("source32", "shards32", "loader", "step", "compiled", "real", "official", "objectives", "jpeg_source",
         "jpeg_shards", "jpeg", "job", "gpu_tests", "profile")


def outcome(name: str, report: dict | None = None, error: str | None = None) -> gpu.Outcome:
    return gpu.Outcome(name=name, command=["python"], seconds=1.0, report=report, error=error)


def train_report(synthetic: float, real: float | None = None) -> dict:
    modes = {"synthetic": {"images_per_s": synthetic, "data_wait": 0.0}}
    if real is not None:
        modes["real"] = {"images_per_s": real, "data_wait": 0.1}
        return {"modes": modes, "real_over_synthetic": real / synthetic}
    return {"modes": modes}


def test_each_goal_is_judged_from_its_part_and_a_missing_figure_is_said():
    objectives = {"benchmark": "objectives", "torch": "2.11.0", "repeats": 60, "maskcon_over_selfcon_time": 1.6,
                  "amp": "bf16",
                  "results": {"maskcon": {"median_ms": 1.6}, "selfcon": {"median_ms": 1.0}}}
    outcomes = [outcome("loader", {"dataset": "imagenet32", "dali_gpu": 61_000.0, "threads": 8,
                                   "cpu_ms_per_image": {"dali_gpu": 0.0091}, "gpu_pipeline_host_us_per_image": 99.0}),
                outcome("step", train_report(29_000.0)), outcome("compiled", train_report(31_000.0)),
                outcome("real", train_report(30_000.0, 28_000.0)), outcome("official", error="timed out after 90 s"),
                outcome("objectives", objectives), outcome("jpeg", error="exit 2: error: no DALI"),
                outcome("job", {"benchmark": "job", "epoch": 2, "images_per_s": 9000.0, "data_wait": 0.02,
                                "feed_cpu_ms_per_batch": 1.5, "gpu_busy": 0.85, "eval_s": [3.0, 4.5],
                                "wall_s": 95.0, "R@1": 12.5}),
                outcome("gpu_tests", {"output": "11 passed, 650 deselected in 80.0s"}),
                outcome("profile", {"profile": {"gpu_idle_share": 0.2, "kernels_per_step": 300.0,
                                                "launches_per_step": 2.0, "aten_ops_per_step": 40.0,
                                                "kernels": [{"name": "sm90_gemm", "share": 0.3}]}})]
    figures = gpu._figures(outcomes)
    assert figures["loader"] == ("61,000 img/s", True)
    assert figures["host"] == ("9.1 us (all threads, dali_gpu)", False)  # the GPU's own figure, not the proxy
    assert figures["step"] == ("31,000 pairs/s (compiled)", True)        # the better of eager and compiled
    assert figures["real"] == ("93.3%", False)                           # 28,000 / 30,000 < 95 %
    assert figures["objectives"] == ("1.60x", False)
    assert figures["jpeg"] == ("-", None)
    assert figures["busy"] == ("85%", False)                             # 0.85 of the last epoch's samples
    context = {"card": "NVIDIA H200", "memory_gib": 140, "date": "2026-12-03", "command": "python launch/bench.py gpu",
               "device": "cuda",
               "commit": "abc1234", "driver": "580.1", "cpus": 16, "torch": "2.11.0", "cuda": "13.0",
               "dali": "2.4.0", "train_images": 100_000, "jpeg_images": 6000, "jpeg_side": 256}
    block = gpu._block(outcomes, context)
    assert "| official | timed out after 90 s | 1 |" in block
    assert "| 224-px JPEG real training / synthetic | - | >= 95 % | no figure |" in block
    assert "| real training / synthetic | 93.3% | >= 95 % | NOT met |" in block
    for text in ("NVIDIA H200 (140 GiB)", "driver 580.1", "torch 2.11.0", "DALI 2.4.0", "abc1234",
                 "`python launch/bench.py gpu`", "| gpu_tests | 11 passed, 650 deselected in 80.0s |",
                 "| loader | dali_gpu 61,000 img/s, 9.1 us CPU/img (8 threads",
                 "| objectives | repeats 60, maskcon_over_selfcon_time 1.6 |",
                 "gpu_busy 0.85, eval_s 3; 4.5, wall_s 95, R@1 12.5", "GPU idle 0.2; per step 300.0 kernels, "
                 "2.0 launches, 40.0 aten operators; longest kernel sm90_gemm (30%)",
                 "| GPU busy during the main job's last epoch | 85% | >= 90 % |"):
        assert text in block


def test_a_group_of_parts_runs_with_the_data_it_needs_and_keeps_shards_written_before(tmp_path):
    (tmp_path / "s32").mkdir()
    (tmp_path / "s32" / "manifest.json").write_text("{}")     # an earlier call's shards
    outcomes = gpu._run_parts(tmp_path, gpu.SIZES["small"], "cpu", gpu._chosen("job", []), deadline=0)
    assert [o.name for o in outcomes] == ["source32", "shards32", "job", "gpu_tests", "profile"]
    assert outcomes[0].report["output"].startswith("kept") and outcomes[1].report["output"].startswith("kept")
    assert {o.error for o in outcomes[2:]} == {"not run: the time budget was spent"}
    speed = gpu._run_parts(tmp_path / "fresh", gpu.SIZES["small"], "cpu", gpu._chosen("speed", []), deadline=0)
    assert [o.name for o in speed] == [name for name in PARTS if name not in gpu.PARTS["job"]]
    everything = gpu._run_parts(tmp_path / "all", gpu.SIZES["small"], "cpu", gpu._chosen("all", []), deadline=0)
    assert [o.name for o in everything] == list(PARTS)


@pytest.mark.parametrize("options, says", [(["--budget", "0"], "--budget must be a positive number"),
                                           (["--out", "{tmp}"], "is a folder; name the block's file"),
                                           (["--work", "{tmp}/file"], "is a file; name a folder")])
def test_a_place_or_budget_that_cannot_serve_is_refused_before_any_part(tmp_path, options, says):
    (tmp_path / "file").write_text("")
    options = [option.format(tmp=tmp_path) for option in options]
    with pytest.raises(UserError, match=re.escape(says)) as caught:
        gpu.main(["--device", "cpu", "--small", *options])
    assert "\n" not in str(caught.value) and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_the_block_names_each_variant_and_only_the_goals_of_the_parts_that_ran(tmp_path):
    chosen = gpu._chosen("real", ["r4=real --workers 4"])
    outcomes = gpu._run_parts(tmp_path, gpu.SIZES["small"], "cpu", chosen, deadline=0)
    context = {"card": "NVIDIA H100", "memory_gib": 80, "date": "2026-12-05", "command": "c", "device": "cuda",
               "commit": "abc1234", "driver": "580", "cpus": 16, "torch": "2.11.0", "cuda": "13.0", "dali": "2.4.0",
               "train_images": 100_000, "jpeg_images": 6000, "jpeg_side": 256}
    block = gpu._block(outcomes, context)
    assert "| r4 = real --workers 4 | not run: shards32 failed |" in block
    assert "| real training / synthetic | - | >= 95 % | no figure |" in block
    assert block.count(" | no figure |") == 1 and "JPEG" not in block      # no loader, step, job, jpeg goal


def test_a_variant_runs_its_part_again_with_its_options_right_after_it(tmp_path):
    chosen = gpu._chosen("job,real", ["r4=real --workers 4", "nchw=real --channels-last false",
                                      "eval=job --eval-batch-size 2048"])
    outcomes = gpu._run_parts(tmp_path, gpu.SIZES["small"], "cpu", chosen, deadline=0)
    assert [o.name for o in outcomes] == ["source32", "shards32", "real", "r4", "nchw", "job", "eval", "gpu_tests",
                                          "profile"]
    by_name = {o.name: o.command for o in outcomes}
    assert by_name["r4"] == by_name["real"] + ["--workers", "4"]
    assert by_name["nchw"] == by_name["real"] + ["--channels-last", "false"]
    assert by_name["eval"] == by_name["job"] + ["--eval-batch-size", "2048"]
    assert "launch/bench.py" in by_name["real"][1] and by_name["real"][2] == "train"


@pytest.mark.parametrize("parts, variants, says", [
    ("real,jpg", [], "--parts: unknown jpg; choose all, speed, job or parts among loader,"),
    (" , ", [], "--parts: empty; choose"),
    ("job", ["r4=real --workers 4"], "'r4=real --workers 4': real is not among the parts that run; add it to --parts"),
    ("real", ["x=nothing"], "'nothing' is not a part; choose one of real"),
    ("real", ["a=real --workers 4", "b=a --workers 2"], "'a' is not a part; choose one of real"),
    ("real", ["real=real --workers 4"], "real is already the name of a part or a variant"),
    ("real", ["a=real --workers 4", "a=real --workers 2"], "a is already the name of a part or a variant"),
    ("real", ["=real --workers 4"], "write NAME=PART OPTIONS"), ("real", ["real --workers 4"], "write NAME=PART"),
    ("real", ["a=real --run-name 'x"], "a quote is not closed")])
def test_a_wrong_part_or_variant_is_one_line(parts, variants, says):
    with pytest.raises(UserError, match=re.escape(says)) as caught:
        gpu._chosen(parts, variants)
    assert "\n" not in str(caught.value)


def test_a_part_that_hangs_or_fails_gives_one_line(tmp_path):
    hangs = outcome("step")               # a part that hangs, with a worker process of its own
    pid_file = tmp_path / "worker.pid"
    hangs.command = [sys.executable, "-c", "import subprocess, sys, time; worker = subprocess.Popen([sys.executable, "
                     "'-c', 'import time; time.sleep(120)']); open(sys.argv[1], 'w').write(str(worker.pid)); "
                     "time.sleep(60)", str(pid_file)]
    gpu._run_one(hangs, timeout=5)
    assert hangs.error == "timed out after 5 s" and hangs.seconds < 30
    worker = Path(f"/proc/{pid_file.read_text()}/status")
    for _ in range(50):                                     # ended with the part (then reaped by init)
        if not worker.exists() or "zombie" in worker.read_text():
            break
        time.sleep(0.1)
    assert not worker.exists() or "zombie" in worker.read_text()
    fails = outcome("loader")
    fails.command = [sys.executable, "-c", "import sys; print('error: no DALI here', file=sys.stderr); sys.exit(2)"]
    gpu._run_one(fails, timeout=30)
    assert fails.error == "exit 2: error: no DALI here" and fails.report is None
    reports = outcome("objectives")
    reports.command = [sys.executable, "-c", "print('objectives: warming up'); print('{\"x\": 1}')"]
    gpu._run_one(reports, timeout=30)
    assert reports.error is None and reports.report == {"x": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_the_command_stops_with_one_line():
    with pytest.raises(UserError, match="no CUDA GPU") as caught:
        gpu.main([])
    assert "\n" not in str(caught.value)


def test_the_block_never_goes_into_benchmarks_md():
    before = (ROOT / "BENCHMARKS.md").read_bytes()
    with pytest.raises(UserError, match="BENCHMARKS.md"):
        gpu.main(["--device", "cpu", "--small", "--budget", "1", "--out", str(ROOT / "BENCHMARKS.md")])
    assert (ROOT / "BENCHMARKS.md").read_bytes() == before


@pytest.mark.slow
def test_the_whole_command_runs_small_on_the_cpu_and_writes_every_part(tmp_path):
    out = tmp_path / "block.md"
    done = subprocess.run([sys.executable, "-c", "import sys; from maskcon.bench.gpu import main; "
                           "sys.exit(main(sys.argv[1:]))", "--device", "cpu", "--small", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=3300)
    assert done.returncode in (0, 1) and out.exists(), done.stderr[-2000:]
    block = out.read_text()
    for part in PARTS:
        assert f"| {part} | " in block
    for title, *_ in gpu.GOALS.values():
        assert f"| {title} | " in block
    assert block.count("| not judged on the CPU |") == len(gpu.GOALS)   # tiny CPU runs judge no GPU goal
    parts = {part["name"]: part for part in json.loads(Path(str(out) + ".json").read_text())["parts"]}
    assert list(parts) == list(PARTS)
    # everything but the compiled step (minutes of code generation on two cores) gives its figures here
    for name in set(PARTS) - {"compiled"}:
        assert parts[name]["error"] is None, (name, parts[name]["error"])
    assert parts["real"]["report"]["modes"]["real"]["images_per_s"] > 0
    assert parts["jpeg"]["report"]["real_over_synthetic"] > 0
    assert parts["objectives"]["report"]["maskcon_over_selfcon_time"] > 0
    assert parts["job"]["report"]["R@1"] is not None and parts["job"]["report"]["epoch"] == 2
    assert parts["job"]["report"]["images_per_s"] > 0 and parts["job"]["report"]["eval_s"][-1] > 0
    assert parts["profile"]["report"]["profile"]["aten_ops_per_step"] > 0
    assert "skipped" in parts["gpu_tests"]["report"]["output"]           # no GPU here: the GPU tests skip


def _processes_naming(text: str) -> list[str]:
    """The command lines of the processes that name `text` (a folder of this test's)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(text in part for part in process.info["cmdline"] or []):
                found.append(" ".join(process.info["cmdline"]))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("door, stop", [("bench", "SIGINT"), ("bench", "SIGTERM"), ("script", "Ctrl-C"),
                                        ("script", "SIGTERM")])
def test_a_stop_signal_ends_the_running_part_and_writes_the_parts_before_it(tmp_path, door, stop):
    work, out = tmp_path / "work", tmp_path / ("gpu-job.md" if door == "script" else "block.md")
    options = ["--device", "cpu", "--small", "--work", str(work)]
    command = (["bash", "launch/gpu-check.sh", "job", *options] if door == "script" else
               [sys.executable, "launch/bench.py", "gpu", "--parts", "job", *options, "--out", str(out)])
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not any("launch/train.py" in line for line in _processes_naming(str(work / "s32"))):   # the main job runs
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-2000:]
        time.sleep(0.5)
    time.sleep(2)
    if stop == "Ctrl-C":                                      # the terminal signals its foreground group
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(getattr(signal, stop))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-2000:]
    block = out.read_text()
    assert "| job | stopped by a signal |" in block and "| shards32 | " in block and "| gpu_tests |" not in block
    assert "stopped by a signal: the block holds the parts that ran before it" in output
    if door == "script":
        assert (tmp_path / "log-job.txt").read_text().strip().endswith("exit status 130")
        assert block.count("--work") == 1            # the user's, not also the script's default
    for _ in range(100):                                     # every process of the part has ended
        if not _processes_naming(str(work)):
            break
        time.sleep(0.1)
    assert not _processes_naming(str(work))
