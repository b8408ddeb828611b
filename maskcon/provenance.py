"""Where a run came from: the code's commit, the libraries and the machine, recorded in config.yaml and W&B."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "torchvision", "accelerate", "wandb", "webdataset", "numpy")
DALI_WHEELS = ("nvidia-dali-cuda130", "nvidia-dali-cuda120")   # one per CUDA line: the installed one is recorded


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_state() -> dict:
    """commit: the checkout's HEAD (None outside a git checkout); clean: False when tracked files differ
    from it (None when unknown)."""
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "clean": None if changes is None else changes == ""}


def library_versions() -> dict:
    """Installed version of each library the run depends on (None when not installed), and Python's."""
    versions = {"python": platform.python_version(), **{name: _version(name) for name in LIBRARIES}}
    dali = {name: version for name in DALI_WHEELS if (version := _version(name))}
    return {**versions, **(dali or {"nvidia-dali": None})}


def dali_wheel() -> str | None:
    """The installed DALI wheel and its version ("nvidia-dali-cuda130 2.4.0"), None without DALI."""
    return next((f"{name} {version}" for name in DALI_WHEELS if (version := _version(name))), None)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """The CUDA and cuDNN versions torch was built with, the first GPU's name (None on the CPU), the CPU's model
    and the cores this process may use, the host."""
    import torch

    from maskcon import usable_cpus

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "gpu": gpu, "gpus_visible": torch.cuda.device_count(), "cpu": cpu_name(), "cpus": usable_cpus(),
            "host": platform.node(), "platform": platform.platform()}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows of it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def nvidia_smi(*args: str) -> list[str] | None:
    """The lines nvidia-smi prints for `args` (e.g. "-L", or "--query-gpu=driver_version" with
    "--format=csv,noheader,nounits"), None without nvidia-smi or when it fails."""
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else None


def gpu_field(query: str) -> str | None:
    """The first GPU's `query` field from nvidia-smi (e.g. "driver_version"), None without a GPU or nvidia-smi."""
    lines = nvidia_smi(f"--query-gpu={query}", "--format=csv,noheader,nounits")
    return lines[0] if lines else None


def provenance() -> dict:
    """{"code": code_state(), "libraries": library_versions(), "machine": machine()}: the `provenance`
    entry of config.yaml and of W&B's config."""
    return {"code": code_state(), "libraries": library_versions(), "machine": machine()}
