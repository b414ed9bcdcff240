"""Parts of the CPU step timed alone, for BENCHMARKS.md ("round 4"): the three lookups' backward
(the sorted sum GPUs take against the scatter-add CPUs take), and the matmul shapes of Muon's
Newton-Schulz in XLA:CPU and, when torch is installed, in PyTorch. Each jitted, 200 calls, the
best of three.

    python benchmarks/step_parts.py             # needs data/shakespeare_char (prepare_shakespeare.py)
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import scatter_rows_by_id, sum_rows_by_id  # noqa: E402

MATMULS = [((16, 128, 128), (16, 128, 128)), ((8, 128, 512), (8, 512, 128)),
           ((768, 128), (128, 512))]


def best_ms(call, calls: int = 200) -> float:
    jax.block_until_ready(call())
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls * 1e3)
    return best


def lookups():
    """shakespeare_char_cpu's shapes: 12 x 64 ids of real text, 128 wide."""
    text = np.fromfile("data/shakespeare_char/train.bin", dtype=np.uint16)[: 12 * 64]
    ids = jnp.asarray(text.astype(np.int32).reshape(12, 64))
    cases = {"token (65 ids)": (ids, 65), "bigram (4290 ids)": (ids[:, 1:] * 66 + ids[:, :-1], 4290),
             "value (2 tables x 65 ids)": (jnp.stack([ids, ids + 65]), 130)}
    for name, (table_ids, n) in cases.items():
        grad = jax.random.normal(jax.random.key(0), table_ids.shape + (128,))
        times = [best_ms(lambda f=jax.jit(lambda i, g, f=f: f(i, g, n)): f(table_ids, grad))
                 for f in (sum_rows_by_id, scatter_rows_by_id)]
        print(f"{name}: sorted sum {times[0]:.3f} ms, scatter-add {times[1]:.3f} ms")


def matmuls():
    for shape_a, shape_b in MATMULS:
        flops = 2 * np.prod(shape_a) * shape_b[-1]
        a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate((shape_a, shape_b)))
        ms = best_ms(lambda f=jax.jit(jnp.matmul): f(a, b))
        line = f"{shape_a} @ {shape_b}: XLA:CPU {ms:.3f} ms, {flops / ms / 1e6:.0f} GFLOP/s"
        try:
            import torch
        except ImportError:
            print(line)
            continue
        ta, tb = torch.randn(shape_a), torch.randn(shape_b)
        ms = best_ms(lambda: ta @ tb)
        print(f"{line} | PyTorch {ms:.3f} ms, {flops / ms / 1e6:.0f} GFLOP/s")


if __name__ == "__main__":
    lookups()
    matmuls()
