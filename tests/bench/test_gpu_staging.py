"""The staging plan for the GPU machine: parts that add up to the bundle, calls that fit the device
tool's limits, and a join that refuses a damaged part."""
import hashlib
import tarfile

import pytest

from bench.gpu_staging import PART_BYTES, ROOT, bundle, join_parts, nvidia_lib_dirs, plan_calls, split_file

CALL_CARRY_LIMIT = 64 * 2**20  # what one call of the device tool carries, working tree included
COMMAND_LIMIT = 2000  # characters in one call's command


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "whl"
    folder.mkdir()
    made = []
    for i, size in enumerate((2500, 700, 1)):
        w = folder / f"pkg{i}-1.0-py3-none-any.whl"
        w.write_bytes(bytes((i * 7 + j) % 251 for j in range(size)))
        made.append(w)
    return made


def test_parts_add_up_and_join_back(wheels, tmp_path):
    digest = bundle(wheels, tmp_path / "bundle.tar")
    size = (tmp_path / "bundle.tar").stat().st_size
    parts = split_file(tmp_path / "bundle.tar", tmp_path / "stage", part_bytes=1000)
    assert len(parts) == -(-size // 1000) and sum(p.stat().st_size for p in parts) == size
    assert all(p.stat().st_size == 1000 for p in parts[:-1])
    unpacked = join_parts(tmp_path / "stage", digest)
    for w in wheels:
        assert (unpacked / w.name).read_bytes() == w.read_bytes()


def test_a_damaged_or_missing_part_is_refused(wheels, tmp_path):
    digest = bundle(wheels, tmp_path / "bundle.tar")
    parts = split_file(tmp_path / "bundle.tar", tmp_path / "stage", part_bytes=1000)
    parts[1].unlink()
    with pytest.raises(ValueError, match="a part is missing or damaged"):
        join_parts(tmp_path / "stage", digest)
    with pytest.raises(FileNotFoundError, match="no parts"):
        join_parts(tmp_path / "empty", digest)


def test_the_calls_fit_the_device_tool():
    # the real wheels' sizes (onnxruntime-gpu 1.31.1 cp312 is 255,569,273 bytes) in 50 MiB parts
    parts = [ROOT / ".stage" / "parts" / f"part-{i:02d}" for i in range(7)]
    digest = hashlib.sha256(b"x").hexdigest()
    calls = plan_calls(parts, digest, "--model none")
    tree = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts
               and ".whl" not in p.parts and ".stage" not in p.parts and "__pycache__" not in p.parts)
    assert tree + PART_BYTES < CALL_CARRY_LIMIT
    assert [c["carry"] for c in calls] == [[f".stage/parts/part-{i:02d}"] for i in range(7)]
    assert all(len(c["command"]) <= COMMAND_LIMIT and c["command"].startswith("mkdir -p /tmp/stage && mv ") for c in calls)
    last = calls[-1]["command"]
    assert f"finish --sha256 {digest} -- --out $OUT/gpu.json --model none" in last and "| tee $OUT/gpu.log" in last
    assert all("finish" not in c["command"] for c in calls[:-1])


def test_nvidia_lib_folders_are_found(tmp_path):
    for lib in ("nvidia/cublas/lib/libcublas.so.13", "nvidia/cu13/lib/libcudart.so.13", "nvidia/cudnn/include/x.h"):
        (tmp_path / lib).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / lib).write_bytes(b"")
    assert nvidia_lib_dirs([str(tmp_path)]) == [str(tmp_path / "nvidia/cu13/lib"), str(tmp_path / "nvidia/cublas/lib")]


def test_a_bundle_is_a_plain_tar_of_the_wheels(wheels, tmp_path):
    bundle(wheels, tmp_path / "b.tar")
    with tarfile.open(tmp_path / "b.tar") as tar:
        assert sorted(tar.getnames()) == sorted(w.name for w in wheels)
