"""Shared test setup: the repo root on sys.path and the offline data in ../shared (or wherever
EQXGPT_SHARED points, for a clone that does not sit beside it)."""

import os
import sys
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


@pytest.fixture(scope="session")
def shakespeare_input() -> Path:
    path = SHARED / "data" / "tinyshakespeare" / "input.txt"
    assert path.exists(), (f"{path} is missing: tests need ../shared beside the repo, or "
                           "EQXGPT_SHARED set to its path")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the scripts (seconds each)")
