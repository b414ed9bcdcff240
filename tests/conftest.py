"""Shared test setup: the repo root on sys.path and the offline data in ../shared (or wherever
EQXGPT_SHARED points, for a clone that does not sit beside it)."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EQXGPT_SHARED", REPO.parent / "shared")).resolve()
sys.path.insert(0, str(REPO))
# GPT-2 BPE files come from tiktoken's cache in ../shared: tests never touch the network.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "data" / "tiktoken"))
# Tests that compare two computation paths in float32 assume float32 matmuls. On a GPU, XLA's
# default runs them in TF32 (10-bit mantissa); ask for full float32 here and in subprocesses.
# A no-op on CPU. Tests of the bf16 path state their own, looser, tolerance.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# The suite compiles far more than it runs: with LLVM's optimisations off each XLA:CPU compile
# takes about half as long, and with XLA:CPU's older fusion emitters a quarter less again
# (BENCHMARKS.md, "The test suite's time"). Results can move by an ulp or two against an
# optimised compile, and every comparison here runs both sides under the same flags.
# Subprocesses inherit them; those given fake devices add to them (fake_devices).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def fake_devices(n: int) -> dict:
    """Environment for a subprocess with n fake CPU devices (on CPU even where a GPU is present),
    the suite's XLA flags kept."""
    return {"XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={n}",
            "JAX_PLATFORMS": "cpu"}


# One persistent compilation cache for this session and every process it starts: the same tiny
# programs are compiled once, not by every launch again (BENCHMARKS.md, "The test suite's time").
# A planted bug changes the program, and so its key. An empty JAX_COMPILATION_CACHE_DIR: no cache.
SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    SESSION_CACHE = tempfile.mkdtemp(prefix="eqxgpt_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = SESSION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="session")
def shakespeare_input() -> Path:
    path = SHARED / "data" / "tinyshakespeare" / "input.txt"
    assert path.exists(), (f"{path} is missing: tests need ../shared beside the repo, or "
                           "EQXGPT_SHARED set to its path")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the scripts (seconds each)")


def pytest_unconfigure(config):
    if SESSION_CACHE is not None:
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)
