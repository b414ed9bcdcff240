"""Throughput of the training step for any config: ms/step, tokens/s, MFU, peak memory.

    python bench.py --config=openwebtext --data_dir=data/shakespeare   # GPT-2 124M, T=1024
    python bench.py --config=shakespeare_char --steps=50
    python bench.py --config=openwebtext --batch_size=16 --grad_accum=1 --model.remat=true
    python bench.py --config=openwebtext --profile=/tmp/trace        # + GPU time per kernel

Runs the same jit-compiled, donated train_step as train.py: compiles, runs warmup steps, then
times --steps steps between two host syncs. The batches have real text's token statistics: they
come from the config's dataset (or --data_dir) when it is prepared, else from a Zipf-distributed
stream, and the output says which. Uniform random ids would hide the cost of frequent tokens
(they once hid 25 ms/step of scatter-add collisions in the embedding's gradient).
"""

import argparse
import collections
import gzip
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

import data
import train
from cli import ArgumentParser, UserError, apply_overrides, load_config, run_cli
from model import num_params


def zipf_tokens(vocab_size: int, n: int = 2**22, exponent: float = 1.1) -> np.ndarray:
    """A stream whose token frequencies fall off as rank^-1.1, roughly as words in text do."""
    ranks = np.random.default_rng(0).zipf(exponent, size=n)
    return ((ranks - 1) % vocab_size).astype(np.int32)


def token_stream(config: train.TrainConfig, data_dir: str | None) -> tuple[np.ndarray, str]:
    """(tokens to draw batches from, where they came from)."""
    explicit = data_dir is not None
    data_dir = data_dir or config.data_dir
    if not explicit and not (Path(data_dir) / "meta.json").exists():
        return zipf_tokens(config.model.vocab_size), f"Zipf(1.1) stream ({data_dir} not prepared)"
    meta = data.load_meta(data_dir)  # an explicit --data_dir that is missing: one-line error
    if meta["vocab_size"] > config.model.vocab_size:
        raise UserError(f"{data_dir} has a vocabulary of {meta['vocab_size']}, more than "
                        f"model.vocab_size={config.model.vocab_size}: pick the matching config")
    return data.open_split(data_dir, "train", meta), f"{data_dir} (train split)"


def peak_memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB on {jax.devices()[0].device_kind}"
    # CPU backends keep no allocator statistics: the process's peak resident memory instead
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"


def benchmark(config: train.TrainConfig, steps: int, warmup: int, tokens: np.ndarray,
              profile_dir: str | None = None) -> dict:
    mesh = train.make_mesh(config)
    abstract_params, abstract_opt, static, optimizer = train.abstract_state(config, mesh)
    params, opt_state = train.init_state(config, abstract_params, abstract_opt, optimizer)
    model = eqx.combine(params, static)
    train_step = train.make_train_step(config, optimizer, abstract_params)

    # The batches train.py would draw (seed 1337), made before timing: the host's sampling is
    # not the step's cost (the training loop prefetches it in a thread).
    sampler = data.BatchSampler(tokens, config.model.block_size, config.batch_size,
                                config.grad_accum, seed=1337)
    batches = [sampler.batch(step) for step in range(1 + warmup + steps)]
    sharding = train.batch_sharding(mesh)
    key_data = np.zeros(2, np.uint32)

    def run(first_step, n):
        nonlocal model, opt_state
        metrics = None
        for step in range(first_step, first_step + n):
            x, y = (jax.device_put(a, sharding) for a in batches[step])  # the step donates them
            model, opt_state, metrics = train_step(model, opt_state, x, y, np.int32(step), key_data)
        return jax.block_until_ready(metrics)

    start = time.perf_counter()
    run(0, 1)
    compile_s = time.perf_counter() - start
    run(1, warmup)
    if profile_dir:
        jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    metrics = run(1 + warmup, steps)
    seconds = (time.perf_counter() - start) / steps
    if profile_dir:
        jax.profiler.stop_trace()

    tokens_per_s, mfu = train.throughput(config, seconds, mesh.size)
    return {
        "params_M": num_params(model) / 1e6,
        "compile_s": compile_s,
        "ms_per_step": seconds * 1e3,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_memory": peak_memory(),
        "loss": float(metrics["loss"]),
    }


def kernel_times(profile_dir: str, steps: int, top: int = 20) -> list[tuple[str, float, int]]:
    """(kernel, ms per step, launches per step) summed over the device's events in the perfetto
    trace that jax.profiler wrote, largest first. Numbers in fusion names are dropped, so
    `loop_add_fusion_3` and `loop_add_fusion_7` count together."""
    trace_file = max(Path(profile_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    events = json.loads(gzip.decompress(trace_file.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in names.items() if "/device:" in name}
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in devices:
            name = re.sub(r"[._]\d+", "", e["name"])
            total[name] += e.get("dur", 0) / 1e3 / steps
            count[name] += 1 / steps
    return [(name, ms, round(count[name])) for name, ms in total.most_common(top)]


def writable_directory(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file there (FileExistsError), read-only, no permission
        raise UserError(f"--profile={path}: cannot make that directory ({e.strerror or e}): pass "
                        "a directory path you can write to") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"--profile={path}: cannot write there: pass a directory you can write to")


def main(argv):
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a name in configs/ or a .py path")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--data_dir", help="a prepared dataset to draw batches from "
                        "(default: the config's, or a Zipf stream when it is not prepared)")
    parser.add_argument("--profile", metavar="DIR", help="trace the timed steps into DIR and "
                        "print the device time per kernel")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    config = apply_overrides(load_config(args.config), overrides)
    train.check_attention(config)
    if args.profile:  # written after the timed steps: find out now that it cannot be
        writable_directory(Path(args.profile))
    tokens, source = token_stream(config, args.data_dir)
    result = benchmark(config, args.steps, args.warmup, tokens, args.profile)
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a (peak unknown for this device)"
    print(f"config {args.config} {' '.join(overrides)}".rstrip())
    print(f"devices {jax.device_count()} x {jax.devices()[0].device_kind} | "
          f"params {result['params_M']:.1f}M | tokens/step {config.tokens_per_step:,} | "
          f"compute {config.model.compute_dtype} | attention {config.model.attention} | "
          f"tokens from {source}")
    print(f"compile {result['compile_s']:.1f}s | {result['ms_per_step']:.1f} ms/step | "
          f"{result['tokens_per_s']:,.0f} tokens/s | MFU {mfu} | peak memory {result['peak_memory']}")
    if args.profile:
        rows = kernel_times(args.profile, args.steps)
        if not rows:
            print("no device kernels in the trace (a CPU run has none)")
        for name, ms, launches in rows:
            print(f"{ms:8.2f} ms/step {launches:5d}x  {name[:100]}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
