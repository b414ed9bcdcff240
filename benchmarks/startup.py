"""From the command's start to "step 1: compiled and ran", `launch.py --config=shakespeare_char_cpu
--max_steps=1`: a cold compilation cache (a new folder), the warm one the cold run left, the cache
off; and what importing costs. For BENCHMARKS.md "Startup and the compilation cache".

    python benchmarks/startup.py                # needs data/shakespeare_char
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def first_step(env: dict, rundir: str) -> tuple[float, float]:
    """(seconds to the first step's line, seconds for the whole command)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "launch.py", "--config=shakespeare_char_cpu", "--max_steps=1",
         "--eval_iters=1", f"--rundir={rundir}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    seen = None
    for line in process.stdout:
        if "compiled and ran" in line and seen is None:
            seen = time.perf_counter() - start
    process.wait()
    return seen, time.perf_counter() - start


def import_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, check=True)
    return time.perf_counter() - start


for round_ in range(2):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp()}
    cold = first_step(env, tempfile.mkdtemp() + "/run")
    warm = first_step(env, tempfile.mkdtemp() + "/run")
    off = first_step({**env, "JAX_COMPILATION_CACHE_DIR": ""}, tempfile.mkdtemp() + "/run")
    print(f"round {round_ + 1}: to the first step cold cache {cold[0]:.1f} s (whole command "
          f"{cold[1]:.1f}), warm {warm[0]:.1f} s ({warm[1]:.1f}), cache off {off[0]:.1f} s "
          f"({off[1]:.1f})")
    print(f"  python -c 'import X': jax {import_seconds('jax'):.2f} s, train "
          f"{import_seconds('train'):.2f} s, python alone {import_seconds('sys'):.2f} s")
