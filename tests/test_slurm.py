"""launch/slurm.sh under a fake SLURM, and the shutdown grace of a real `accelerate launch`.

The fake `srun` behaves as SLURM >= 22.05 does: a step's CPUs per task come from its own --cpus-per-task
(or SRUN_CPUS_PER_TASK), never from sbatch's; each task's environment carries the step's count in
SLURM_CPUS_PER_TASK. The fake `accelerate` records its arguments and environment, one JSON line per node.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "slurm.sh"
NODELIST = "gpu-b[07-08]"
HOSTS = ["gpu-b07", "gpu-b08"]

FAKE_SRUN = '''
import json, os, subprocess, sys
args, options = sys.argv[1:], {}
while args[0].startswith("-"):
    option = args.pop(0)
    name, value = option.split("=", 1) if "=" in option else (option, args.pop(0))
    options[name] = value
with open(os.environ["RECORD"], "a") as record:
    record.write(json.dumps({"program": "srun", "options": options}) + "\\n")
cpus = options.get("--cpus-per-task") or os.environ.get("SRUN_CPUS_PER_TASK") or "1"
for node in range(int(options["--nodes"])):
    subprocess.run(args, env=dict(os.environ, SLURM_NODEID=str(node), SLURM_CPUS_PER_TASK=cpus), check=True)
'''
FAKE_SCONTROL = f'''
import sys
assert sys.argv[1:] == ["show", "hostnames", {NODELIST!r}], sys.argv
print("\\n".join({HOSTS!r}))
'''
FAKE_PYTHON = '''
import json, os, sys
with open(os.environ["RECORD"], "a") as record:
    record.write(json.dumps({"program": "python", "argv": sys.argv[1:], "world_size": os.environ.get("WORLD_SIZE")}) + "\\n")
'''
FAKE_ACCELERATE = '''
import json, os, sys
names = ("SLURM_NODEID", "SLURM_CPUS_PER_TASK", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
with open(os.environ["RECORD"], "a") as record:
    record.write(json.dumps({"program": "accelerate", "argv": sys.argv[1:],
                             "env": {name: os.environ.get(name) for name in names}}) + "\\n")
'''


def signal_grace_s() -> int:
    """The TERM@ lead time of the script's `#SBATCH --signal` line."""
    return int(re.search(r"^#SBATCH --signal=TERM@(\d+)$", SCRIPT.read_text(), re.MULTILINE).group(1))


def run_under_fake_slurm(tmp_path: Path, args: tuple[str, ...] = (), **environment: str
                         ) -> tuple[list[dict], list[dict]]:
    """Run launch/slurm.sh as sbatch would on 2 nodes; returns (srun records, accelerate records by node)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("accelerate", FAKE_ACCELERATE),
                       ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{body}")
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "record.jsonl"
    record.unlink(missing_ok=True)
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SLURM_", "SRUN_")) and name not in (
               "GPUS_PER_NODE", "MAIN_PROCESS_PORT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(record), SLURM_SUBMIT_DIR=str(ROOT),
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST=NODELIST, SLURM_GPUS_PER_NODE="h100:4",
               SLURM_JOB_ID="4242", **environment)
    subprocess.run(["bash", str(SCRIPT), "--dataset", "imagenet32", "--run-name", "two words", *args], cwd=tmp_path,
                   env=env, check=True, capture_output=True, timeout=60)
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    sruns = [line for line in lines if line["program"] == "srun"]
    launches = sorted((line for line in lines if line["program"] == "accelerate"),
                      key=lambda line: line["env"]["SLURM_NODEID"])
    return sruns, launches


def test_cpus_shutdown_timeout_and_process_layout_reach_accelerate_launch(tmp_path):
    # as sbatch sets them for --cpus-per-task=32 on nodes of 64 CPUs
    sruns, launches = run_under_fake_slurm(tmp_path, SLURM_CPUS_PER_TASK="32", SLURM_CPUS_ON_NODE="64")
    assert len(sruns) == 1 and sruns[0]["options"]["--nodes"] == "2"
    assert sruns[0]["options"]["--ntasks-per-node"] == "1"
    assert [launch["env"]["SLURM_NODEID"] for launch in launches] == ["0", "1"]
    for node, launch in enumerate(launches):
        assert launch["env"]["SLURM_CPUS_PER_TASK"] == "32"
        assert int(launch["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= signal_grace_s()
        assert launch["argv"] == [
            "launch", "-q", "--config_file", "launch/accelerate/multinode.yaml", "--num_machines", "2",
            "--num_processes", "8", "--machine_rank", str(node), "--main_process_ip", HOSTS[0],
            "--main_process_port", str(29500 + 4242 % 1000), "launch/train.py", "--dataset", "imagenet32",
            "--run-name", "two words", "--output-dir", "runs/maskcon-4242", "--resume", "auto"]


def test_the_run_is_checked_once_for_all_its_processes_before_the_nodes_start(tmp_path):
    run_under_fake_slurm(tmp_path, SLURM_CPUS_PER_TASK="32")
    lines = [json.loads(line) for line in (tmp_path / "record.jsonl").read_text().splitlines()]
    assert lines[0] == {"program": "python", "world_size": "8",
                        "argv": ["launch/train.py", "--check", "--dataset", "imagenet32", "--run-name", "two words",
                                 "--output-dir", "runs/maskcon-4242", "--resume", "auto"]}
    assert [line["program"] for line in lines].count("python") == 1


@pytest.mark.slow
def test_a_bad_option_is_one_line_and_no_node_starts(tmp_path):
    """The real check (the environment's python): one line, exit 2, srun never called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("accelerate", FAKE_ACCELERATE)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{body}")
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SLURM_", "SRUN_"))}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(tmp_path / "record.jsonl"),
               SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST=NODELIST,
               SLURM_GPUS_PER_NODE="4", SLURM_JOB_ID="4242", PYTHONPATH=str(ROOT))
    for argv, words in ((["--dataset", "mnist"], "unknown dataset 'mnist'"),
                        (["--global-batch", "100"], "does not split evenly over 8")):
        out = subprocess.run(["bash", str(SCRIPT), *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and words in out.stderr
        assert not (tmp_path / "record.jsonl").exists()


def test_a_node_without_gpus_or_nvidia_smi_is_one_line_and_gpus_per_node_then_runs(tmp_path):
    """A CPU-only partition: no GPU count from SLURM, no nvidia-smi on PATH (or one that finds no GPU)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!{sys.executable}\n{FAKE_SCONTROL}")
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    plain = "/usr/bin:/bin"   # neither nvidia-smi nor srun
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SLURM_", "SRUN_")) and name != "GPUS_PER_NODE"}
    env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST=NODELIST, SLURM_JOB_ID="4242")
    for path in (f"{bin_dir}:{plain}", f"{tmp_path / 'only-scontrol'}:{plain}"):
        (tmp_path / "only-scontrol").mkdir(exist_ok=True)
        (tmp_path / "only-scontrol" / "scontrol").write_text(f"#!{sys.executable}\n{FAKE_SCONTROL}")
        (tmp_path / "only-scontrol" / "scontrol").chmod(0o755)
        out = subprocess.run(["bash", str(SCRIPT), "--check"], cwd=tmp_path, env=dict(env, PATH=path),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr == (
            "error: cannot tell how many processes to start per node: the job has no --gpus-per-node and nvidia-smi "
            "lists no GPU here; set GPUS_PER_NODE=N (processes per node; on nodes without GPUs they train on the "
            "CPUs)\n"), (path, out.stderr)
    _, launches = run_under_fake_slurm(tmp_path, GPUS_PER_NODE="3")   # the override the line names
    assert launches[0]["argv"][launches[0]["argv"].index("--num_processes") + 1] == "6"


def test_without_cpus_per_task_the_task_gets_the_node_allocation(tmp_path):
    _, launches = run_under_fake_slurm(tmp_path, SLURM_CPUS_ON_NODE="64")
    assert [launch["env"]["SLURM_CPUS_PER_TASK"] for launch in launches] == ["64", "64"]


def test_a_longer_shutdown_timeout_is_kept(tmp_path):
    _, launches = run_under_fake_slurm(tmp_path, SLURM_CPUS_PER_TASK="8", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300")
    assert [launch["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] for launch in launches] == ["300", "300"]


WORKER = '''
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (out / f"sigterm-{os.environ['RANK']}").touch())
(out / f"ready-{os.environ['RANK']}").touch()
while not (out / f"sigterm-{os.environ['RANK']}").exists():
    time.sleep(0.05)
time.sleep(float(sys.argv[2]))        # the work of the grace: agree to stop, write a checkpoint
(out / f"checkpoint-{os.environ['RANK']}").touch()
'''
WORK_S = 4


def _agent_reads_the_shutdown_timeout() -> bool:
    """PyTorch 2.11 and newer: torchrun's --shutdown_timeout, defaulting to TORCH_ELASTIC_SHUTDOWN_TIMEOUT;
    before, the elastic agent gives its workers a fixed 30 s."""
    from torch.distributed.run import get_args_parser

    return any("--shutdown_timeout" in action.option_strings for action in get_args_parser()._actions)


@pytest.mark.slow
@pytest.mark.parametrize("shutdown_timeout, finishes", [(1, False), (60, True)])
def test_accelerate_launch_gives_workers_the_shutdown_timeout_after_sigterm(tmp_path, shutdown_timeout, finishes):
    """A real `accelerate launch` of 2 processes receives SIGTERM, as SLURM's --signal sends it: its elastic
    agent forwards it, and kills the workers only after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (PyTorch 2.11
    and newer; before, after a fixed 30 s, longer than the workers' work here)."""
    finishes = finishes or not _agent_reads_the_shutdown_timeout()
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(shutdown_timeout))
    launcher = subprocess.Popen(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", "0", str(tmp_path / "worker.py"), str(tmp_path), str(WORK_S)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{rank}").exists() for rank in range(2)):
            assert launcher.poll() is None and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=shutdown_timeout + 60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert all((tmp_path / f"sigterm-{rank}").exists() for rank in range(2))
    assert [(tmp_path / f"checkpoint-{rank}").exists() for rank in range(2)] == [finishes, finishes]


def test_a_requeued_job_continues_in_its_own_folder_and_given_options_are_kept(tmp_path):
    """Without --output-dir and --resume the job writes to runs/JOBNAME-JOBID with --resume auto (the same
    folder after a requeue); options given by the user are passed on as given, never doubled."""
    _, launches = run_under_fake_slurm(tmp_path, SLURM_JOB_NAME="sweep")
    assert launches[0]["argv"][-4:] == ["--output-dir", "runs/sweep-4242", "--resume", "auto"]
    _, launches = run_under_fake_slurm(tmp_path, args=("--output-dir", "runs/mine", "--resume"))
    argv = launches[0]["argv"]
    assert argv.count("--output-dir") == 1 and argv.count("--resume") == 1
    assert argv[argv.index("--output-dir") + 1] == "runs/mine"


def test_outside_a_slurm_job_the_script_says_so_in_one_line():
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    done = subprocess.run(["bash", "launch/slurm.sh", "--dataset", "digits"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: launch/slurm.sh runs in a SLURM job (sbatch --nodes N launch/slurm.sh OPTIONS); here "
        "SLURM_JOB_NUM_NODES is not set"), done.stderr


@pytest.mark.parametrize("option", ["--help", "--check", "--print-config"])
def test_help_check_and_print_config_in_a_job_start_no_node(tmp_path, option):
    """--help: the script's text, then train.py's options; --check and --print-config: the plan or the resolved
    configuration of the whole job (WORLD_SIZE: every GPU of every node); srun never runs."""
    sruns, launches = run_under_fake_slurm(tmp_path, args=(option,))
    assert sruns == [] and launches == []
    lines = [json.loads(line) for line in (tmp_path / "record.jsonl").read_text().splitlines()]
    if option == "--help":
        assert [line["argv"][1:] for line in lines] == [["--help"]]
        assert lines[0]["argv"][0].endswith("launch/train.py")
    else:
        assert lines == [{"program": "python", "world_size": "8", "argv": [
            "launch/train.py", "--dataset", "imagenet32", "--run-name", "two words", option, "--output-dir",
            "runs/maskcon-4242", "--resume", "auto"]}]


def test_help_outside_a_job_prints_the_scripts_text():
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"      # the environment active, as for sbatch
    done = subprocess.run(["bash", "launch/slurm.sh", "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.startswith("Train on several nodes under SLURM") and "sbatch --nodes 2" in done.stdout
    assert "#SBATCH --" not in done.stdout and "usage: python launch/train.py" in done.stdout, done.stderr[-2000:]
