"""The training step's speed, measured as bench.py reports it and benchmarks/ reuse it: real text's
token statistics (or a Zipf stream like them), the step timed between two host syncs, peak memory.
"""

import resource
import time
from pathlib import Path

import jax
import numpy as np

import data
import train
from cli import UserError
from config import TrainConfig, with_data_vocab
from model import num_params
from sharding import batch_sharding, make_mesh


CACHE_HITS: list[str] = []  # persistent compilation cache reads: a "compile" then is a file read


def count_cache_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        CACHE_HITS.append(event)


jax.monitoring.register_event_listener(count_cache_hit)


def zipf_tokens(vocab_size: int, n: int = 2**22, exponent: float = 1.1) -> np.ndarray:
    """A stream whose token frequencies fall off as rank^-1.1, roughly as words in text do."""
    ranks = np.random.default_rng(0).zipf(exponent, size=n)
    return ((ranks - 1) % vocab_size).astype(np.int32)


def with_vocab(config: TrainConfig, data_dir: str | None) -> TrainConfig:
    """model.vocab_size=0 (the data's) read from the dataset (--data_dir, else the config's), as
    training reads it; refused in one line when that dataset is not prepared."""
    if config.model.vocab_size:
        return config
    data_dir = data_dir or config.data_dir
    if not (Path(data_dir) / "meta.json").exists():
        raise UserError(f"model.vocab_size=0 means the data's, and {data_dir} is not prepared: run "
                        f"`{data.prepare_command(data_dir)}` or pass --model.vocab_size")
    return with_data_vocab(config, data.load_meta(data_dir))


def token_stream(config: TrainConfig, data_dir: str | None) -> tuple[np.ndarray, str]:
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


def benchmark(config: TrainConfig, steps: int, warmup: int, tokens: np.ndarray,
              profile_dir: str | None = None) -> dict:
    mesh = make_mesh(config)
    params, opt_state, train_step = train.new_state_and_step(config, mesh)

    # The batches train.py would draw (seed 1337), made before timing: the host's sampling is
    # not the step's cost (the training loop prefetches it in a thread).
    sampler = data.BatchSampler(tokens, config.model.block_size, config.batch_size,
                                config.grad_accum, seed=1337)
    batches = [sampler.batch(step) for step in range(1 + warmup + steps)]
    sharding = batch_sharding(mesh)
    key_data = np.zeros(2, np.uint32)

    def run(first_step, n):
        nonlocal params, opt_state
        metrics = None
        for step in range(first_step, first_step + n):
            x, y = (jax.device_put(a, sharding) for a in batches[step])
            params, opt_state, metrics = train_step(params, opt_state, x, y, np.int32(step), key_data)
        return jax.block_until_ready(metrics)

    hits_before = len(CACHE_HITS)
    start = time.perf_counter()
    run(0, 1)
    compile_s = time.perf_counter() - start
    compiled_from_cache = len(CACHE_HITS) > hits_before
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
        "params_M": num_params(params) / 1e6,
        "compile_s": compile_s,
        "compiled_from_cache": compiled_from_cache,
        "ms_per_step": seconds * 1e3,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_memory": peak_memory(),
        "loss": float(metrics["loss"]),
    }
