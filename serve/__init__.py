"""Serving: the engine, sampling, backends, loading, the API and the terminal chat.

Importing this package sets OpenMP's wait policy to passive (unless the environment chose one),
before anything loads torch: in a serving process torch does only small work beside ONNX Runtime
(sampling and bookkeeping, between graph runs), and OpenMP's default lets its worker threads spin
on after each op, which took a core from ONNX Runtime's next run: one decode step 21 -> 27 ms on 2
cores (`bench/step_profile.py`). A passive worker sleeps at once. The entry points (app.py,
`python -m serve.cli`) import this package before torch, as OpenMP reads the policy once, when it
is loaded.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
