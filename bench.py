"""Throughput for any config: of the training step (ms/step, tokens/s, MFU, peak memory), or of
decoding with --decode (tokens/s with the KV cache and without).

    python bench.py --config=openwebtext --data_dir=data/shakespeare   # GPT-2 124M, T=1024
    python bench.py --config=shakespeare_char --steps=50
    python bench.py --config=openwebtext --batch_size=16 --grad_accum=1 --model.remat=true
    python bench.py --config=openwebtext --profile=/tmp/trace        # + GPU time per kernel
    python bench.py --config=shakespeare_char --decode --model.compute_dtype=float32

Runs the same jit-compiled, donated train_step as train.py: compiles, runs warmup steps, then
times --steps steps between two host syncs. The batches have real text's token statistics: they
come from the config's dataset (or --data_dir) when it is prepared, else from a Zipf-distributed
stream, and the output says which. Uniform random ids would hide the cost of frequent tokens
(they once hid 25 ms/step of scatter-add collisions in the embedding's gradient).

--decode samples from a random-init model of the config's shape, a prompt of one token: the
KV-cached generate (decode.py) against naive_generate below, which reruns the whole window for
every token, as nanoGPT's sampling loop does.
"""

import argparse
import collections
import dataclasses
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from cli import ArgumentParser, UserError, apply_overrides, load_config, run_cli
from config import TrainConfig
from decode import generate, sample_token
from measure import benchmark, token_stream, with_vocab
from model import GPT, GPTConfig, cast_floats, forward, num_params, with_picked_dtype
from train import MEMORY_BANDWIDTH, check_attention, this_device


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


# ---------------------------------------------------------------------------------------------
# Decoding (--decode): the KV cache against rerunning the whole context for every token


def naive_generate(model: GPT, prompt, key, max_new_tokens: int, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0):
    """What decoding costs without a cache (nanoGPT's loop, compiled): every token runs the full
    forward over a fixed block_size window holding the last block_size tokens, zero-padded at the
    end (causal attention: the padding cannot change earlier logits)."""
    config = model.config
    block = config.block_size
    model = cast_floats(model, jnp.dtype(config.compute_dtype))
    prompt = prompt[-block:].astype(jnp.int32)
    window = jnp.zeros(block, jnp.int32).at[: prompt.shape[0]].set(prompt)

    def step(carry, step_key):
        window, length = carry
        hidden, _ = forward(model, window[None])  # every position: the naive part
        logits = model.logits(hidden[0, length - 1]).astype(jnp.float32)  # as nanoGPT: one row
        token = sample_token(logits, step_key, temperature, top_k, top_p)
        full = length == block  # slide by one, like nanoGPT's idx[:, -block_size:]
        window = jnp.where(full, jnp.roll(window, -1), window)
        window = window.at[jnp.where(full, block - 1, length)].set(token)
        return (window, jnp.minimum(length + 1, block)), token

    carry = (window, jnp.int32(prompt.shape[0]))
    _, tokens = jax.lax.scan(step, carry, jr.split(key, max_new_tokens))
    return tokens


def decode_benchmark(model_config: GPTConfig, max_new_tokens: int, num_samples: int) -> dict:
    """Tokens/s of generate and of naive_generate on a random-init model, temperature 0.8, the
    samples vmapped; each compiles on a first call, which is not timed. Also the bound of reading
    every weight once per decoding step at the device's memory bandwidth, where it is known."""
    model = GPT(model_config, key=jr.key(0))
    prompt = jnp.zeros(1, jnp.int32)

    def batched(fn):
        return eqx.filter_jit(lambda m, keys: jax.vmap(
            lambda key: fn(m, prompt, key, max_new_tokens, temperature=0.8))(keys))

    result = {}
    for name, fn in (("cached", batched(generate)), ("naive", batched(naive_generate))):
        jax.block_until_ready(fn(model, jr.split(jr.key(0), num_samples)))  # compile
        start = time.perf_counter()
        jax.block_until_ready(fn(model, jr.split(jr.key(1), num_samples)))
        result[name] = num_samples * max_new_tokens / (time.perf_counter() - start)
    result["weight_bytes"] = num_params(model) * jnp.dtype(model_config.compute_dtype).itemsize
    bandwidth = this_device(MEMORY_BANDWIDTH)
    result["bound"] = num_samples * bandwidth / result["weight_bytes"] if bandwidth else None
    return result


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
    parser.add_argument("--decode", action="store_true", help="time decoding instead: tokens/s "
                        "with the KV cache and without, on a random-init model of the config")
    parser.add_argument("--max_new_tokens", type=int, default=500,
                        help="--decode: tokens generated per sample (default 500)")
    parser.add_argument("--num_samples", type=int, default=1,
                        help="--decode: samples decoded together (default 1)")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise UserError("--max_new_tokens and --num_samples must be >= 1")
    if args.decode and (args.profile or args.data_dir):
        raise UserError("--profile and --data_dir time the training step: drop them or --decode")
    config = apply_overrides(load_config(args.config, TrainConfig), overrides)
    check_attention(config)
    print(f"config {args.config} {' '.join(overrides)}".rstrip())
    picked, note = with_picked_dtype(config.model, jax.devices()[0])  # "auto": this device's
    config = dataclasses.replace(config, model=picked)
    if note:
        print(note)
    if args.profile:  # written after the timed steps: find out now that it cannot be
        writable_directory(Path(args.profile))
    config = with_vocab(config, args.data_dir)
    if args.decode:
        return print_decode(config, args.max_new_tokens, args.num_samples)
    tokens, source = token_stream(config, args.data_dir)
    result = benchmark(config, args.steps, args.warmup, tokens, args.profile)
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a (peak unknown for this device)"
    print(f"devices {jax.device_count()} x {jax.devices()[0].device_kind} | "
          f"params {result['params_M']:.1f}M | tokens/step {config.tokens_per_step:,} | "
          f"compute {config.model.compute_dtype} | attention {config.model.attention} | "
          f"tokens from {source}")
    compiled = "read from the compilation cache in" if result["compiled_from_cache"] else "compile"
    print(f"{compiled} {result['compile_s']:.1f}s | {result['ms_per_step']:.1f} ms/step | "
          f"{result['tokens_per_s']:,.0f} tokens/s | MFU {mfu} | peak memory {result['peak_memory']}")
    if args.profile:
        rows = kernel_times(args.profile, args.steps)
        if not rows:
            print("no device kernels in the trace (a CPU run has none)")
        for name, ms, launches in rows:
            print(f"{ms:8.2f} ms/step {launches:5d}x  {name[:100]}")


def print_decode(config: TrainConfig, max_new_tokens: int, num_samples: int) -> None:
    result = decode_benchmark(config.model, max_new_tokens, num_samples)
    bound = "" if result["bound"] is None else (
        f" | reading the {result['weight_bytes'] / 1e6:.0f} MB of weights once per step bounds it "
        f"at {result['bound']:,.0f} tokens/s")
    print(f"devices 1 x {jax.devices()[0].device_kind} | compute {config.model.compute_dtype} | "
          f"{num_samples} x {max_new_tokens} new tokens after a prompt of 1, block_size "
          f"{config.model.block_size}")
    print(f"cached {result['cached']:,.1f} tokens/s | naive {result['naive']:,.1f} tokens/s | "
          f"cached / naive {result['cached'] / result['naive']:.1f}x{bound}")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
