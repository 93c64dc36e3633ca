"""The serving entry points set OpenMP's wait policy before torch loads OpenMP (serve/__init__.py):
set after, it would be read too late and torch's workers would spin beside ONNX Runtime."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Records the policy in the environment at the moment torch is first imported, then imports `entry`.
PROBE = """
import builtins, os, sys
seen = []
real_import = builtins.__import__
def probe(name, *args, **kwargs):
    if name.split('.')[0] == 'torch' and 'torch' not in sys.modules and not seen:
        seen.append(os.environ.get('OMP_WAIT_POLICY'))
    return real_import(name, *args, **kwargs)
builtins.__import__ = probe
import {entry}
print(seen)
"""


@pytest.mark.parametrize("entry", ["app", "serve.cli"])
def test_the_wait_policy_is_passive_before_torch_loads(entry):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE.format(entry=entry)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['PASSIVE']"


def test_a_policy_the_user_chose_is_kept():
    out = subprocess.run([sys.executable, "-c", "import serve, os; print(os.environ['OMP_WAIT_POLICY'])"], cwd=ROOT,
                         env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ACTIVE"
