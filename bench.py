"""Throughput of the training step for any config: ms/step, tokens/s, MFU, peak memory.

    python bench.py --config=openwebtext                          # GPT-2 124M, T=1024
    python bench.py --config=shakespeare_char_cpu --steps=50
    python bench.py --config=openwebtext --batch_size=16 --grad_accum=1 --model.remat=true

Runs the same jit-compiled, donated train_step as train.py on random tokens (no dataset needed):
compiles, runs warmup steps, then times --steps steps between two host syncs.
"""

import argparse
import resource
import sys
import time

import equinox as eqx
import jax
import numpy as np

import launch
import train
from data import ArgumentParser, run_cli
from model import flops_per_token, num_params


def peak_memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB on {jax.devices()[0].device_kind}"
    # CPU backends keep no allocator statistics: the process's peak resident memory instead
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"


def benchmark(config: train.TrainConfig, steps: int, warmup: int) -> dict:
    mesh = train.make_mesh(config)
    abstract_params, abstract_opt, static, optimizer = train.abstract_state(config, mesh)
    params, opt_state = train.init_state(config, abstract_params, abstract_opt, optimizer)
    model = eqx.combine(params, static)
    train_step = train.make_train_step(config, optimizer, abstract_params)

    shape = (config.grad_accum, config.batch_size, config.model.block_size)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, shape, dtype=np.int32)
    sharding = train.batch_sharding(mesh)
    key_data = np.zeros(2, np.uint32)

    def run(n, first_step):
        nonlocal model, opt_state
        for step in range(first_step, first_step + n):
            batch = jax.device_put(tokens, sharding)  # fresh each step: the step donates it
            model, opt_state, metrics = train_step(model, opt_state, batch, batch,
                                                   np.int32(step), key_data)
        return jax.block_until_ready(metrics)

    start = time.perf_counter()
    run(1, 0)
    compile_s = time.perf_counter() - start
    run(warmup, 1)
    start = time.perf_counter()
    metrics = run(steps, 1 + warmup)
    seconds = (time.perf_counter() - start) / steps

    peak = train.peak_flops_per_device()
    achieved = flops_per_token(config.model) * config.tokens_per_step / seconds
    return {
        "params_M": num_params(model) / 1e6,
        "compile_s": compile_s,
        "ms_per_step": seconds * 1e3,
        "tokens_per_s": config.tokens_per_step / seconds,
        "mfu": achieved / (peak * jax.device_count()) if peak else None,
        "peak_memory": peak_memory(),
        "loss": float(metrics["loss"]),
    }


def main(argv):
    parser = ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a name in configs/ or a .py path")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    args, overrides = parser.parse_known_args(argv)
    config = launch.apply_overrides(launch.load_config(args.config), overrides)
    result = benchmark(config, args.steps, args.warmup)
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a (peak unknown for this device)"
    print(f"config {args.config} {' '.join(overrides)}".rstrip())
    print(f"devices {jax.device_count()} x {jax.devices()[0].device_kind} | "
          f"params {result['params_M']:.1f}M | tokens/step {config.tokens_per_step:,} | "
          f"compute {config.model.compute_dtype} | attention {config.model.attention}")
    print(f"compile {result['compile_s']:.1f}s | {result['ms_per_step']:.1f} ms/step | "
          f"{result['tokens_per_s']:,.0f} tokens/s | MFU {mfu} | peak memory {result['peak_memory']}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
