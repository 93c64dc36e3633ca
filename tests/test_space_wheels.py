"""Every requirement installs on a Space as a wheel for the front matter's Python (pip resolves for
another Python than the one running it), the dedicated GPU's onnxruntime-gpu line included; and
that Python is one ZeroGPU accepts."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ZEROGPU_PYTHONS = ("3.10.13", "3.12.12")  # the Hub's ZeroGPU docs
# The gradio SDK builds a Space on the official python image (Debian bookworm, glibc 2.36), so every
# manylinux tag up to 2_36 runs there; llguidance 1.9 ships manylinux_2_31 wheels only.
PLATFORMS = tuple(f"manylinux_2_{v}_x86_64" for v in range(36, 16, -1)) + ("manylinux2014_x86_64",)
OFFLINE = ("Could not fetch URL", "Max retries exceeded", "Network is unreachable", "Temporary failure in name resolution")


def space_python() -> str:
    front = ROOT.joinpath("README.md").read_text().split("---")[1]
    return re.search(r'^python_version:\s*"?([\d.]+)"?\s*$', front, re.M).group(1)


def space_requirements() -> list[str]:
    """requirements.txt's requirements, plus each replacement its comments name for a dedicated GPU."""
    reqs = []
    for line in ROOT.joinpath("requirements.txt").read_text().splitlines():
        text, _, comment = line.partition(" #")
        if text.strip() and not text.startswith("#"):
            reqs.append(str(Requirement(text.strip())))
        if m := re.search(r"on a dedicated GPU: (\S+)", comment):
            reqs.append(str(Requirement(m.group(1))))
    return reqs


def test_the_space_python_is_one_zerogpu_accepts():
    assert space_python() in ZEROGPU_PYTHONS


@pytest.mark.slow  # ~80 s: pip fetches every wheel's metadata (and some wheels) from PyPI
def test_every_requirement_has_a_wheel_for_the_space_python(tmp_path):
    reqs = space_requirements()
    assert "onnxruntime-gpu==1.31.1" in reqs and any(r.startswith("spaces") for r in reqs)
    (tmp_path / "reqs.txt").write_text("\n".join(reqs) + "\n")
    version = ".".join(space_python().split(".")[:2])
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                          "--only-binary", ":all:", "--python-version", version, "--implementation", "cp", *platforms,
                          "--target", str(tmp_path / "target"), "--report", str(tmp_path / "report.json"),
                          "--disable-pip-version-check", "-r", str(tmp_path / "reqs.txt")],
                         capture_output=True, text=True, timeout=900)
    if run.returncode and any(s in run.stdout + run.stderr for s in OFFLINE):
        pytest.skip("PyPI is unreachable from here: cannot check the wheels")
    assert run.returncode == 0, run.stderr[-2000:]
    found = {canonicalize_name(i["metadata"]["name"]) for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert found == {canonicalize_name(Requirement(r).name) for r in reqs}  # prometheus_client is prometheus-client
