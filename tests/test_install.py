"""Both documented installs, CUDA 13 and CUDA 12, resolve from the package registry to what their constraints
files pin: pip's own resolver, asked for a dry run, as README's install commands ask it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pins(line: str) -> dict[str, str]:
    text = (ROOT / f"constraints-cuda{line}.txt").read_text()
    found = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", text, flags=re.M))
    return {canonical(name): version for name, version in found.items()}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(line: str, tmp_path: Path) -> dict[str, dict]:
    """What `pip install -c constraints-cudaLINE.txt -e ".[cudaLINE,test]"` would install in an empty
    environment: name -> metadata."""
    report = tmp_path / f"cuda{line}.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), "-c", f"constraints-cuda{line}.txt", f".[cuda{line},test]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {canonical(item["metadata"]["name"]): item["metadata"] for item in json.loads(report.read_text())["install"]}


@pytest.mark.slow
@pytest.mark.parametrize("line, other", [("13", "12"), ("12", "13")])
def test_each_cuda_install_resolves_to_its_pins_and_its_cuda_line(line, other, tmp_path):
    resolved = resolve(line, tmp_path)
    pinned = pins(line)
    assert "torch" in pinned and f"nvidia-dali-cuda{line}0" in pinned
    # everything the install takes is pinned, at the pinned version (the project itself aside)
    taken = {name: meta["version"] for name, meta in resolved.items() if name != "maskcon"}
    assert {name: pinned.get(name) for name in taken} == taken
    assert f"nvidia-dali-cuda{line}0" in taken and f"nvidia-dali-cuda{other}0" not in taken
    # the CUDA runtime and cuDNN that PyTorch brings are of this line, and no library of the other comes along
    runtime = {name: version for name, version in taken.items() if name.startswith("nvidia-cuda-runtime")}
    assert runtime and all(version.startswith(f"{line}.") for version in runtime.values()), runtime
    assert f"nvidia-cudnn-cu{line}" in taken
    assert not [name for name in taken if name.endswith(f"-cu{other}")]
    # and the test extra comes with it: the suite runs on either install
    assert {"pytest", "pytest-timeout", "pytest-xdist"} <= set(taken)


def test_the_constraints_files_pin_the_projects_own_dependencies():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {canonical(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])
             for requirement in project["dependencies"] + project["optional-dependencies"]["test"]}
    for line in ("13", "12"):
        assert names <= set(pins(line)), names - set(pins(line))
