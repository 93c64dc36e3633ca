"""The install files agree: a CPU Space's pre-requirements.txt brings the torch that requirements.txt
pins, and requirements.txt itself names no extra index (an unreachable one costs every fresh
install ~7.5 s per package in pip's retries)."""
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _requirements(path: Path) -> tuple[list[str], dict[str, Requirement]]:
    options, reqs = [], {}
    for line in path.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("-"):
            options.append(line)
        elif line and not line.startswith("#"):
            r = Requirement(line)
            reqs[r.name] = r
    return options, reqs


def test_space_gets_the_pinned_torch_as_its_cpu_build():
    options, reqs = _requirements(ROOT / "requirements.txt")
    assert options == []  # no index lines: local and CI installs stay as fast and offline-safe as before
    pre_options, pre = _requirements(ROOT / "pre-requirements.txt")
    assert pre_options == ["--extra-index-url https://download.pytorch.org/whl/cpu"]
    (cpu_pin,) = [str(s.version) for s in pre["torch"].specifier]
    assert cpu_pin.endswith("+cpu")
    # requirements.txt's pin accepts the CPU build pre-requirements.txt installed, so pip keeps it
    assert reqs["torch"].specifier.contains(cpu_pin)
    assert cpu_pin.removesuffix("+cpu") == str(next(iter(reqs["torch"].specifier)).version)
