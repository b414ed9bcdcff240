"""Text from a trained run: restores its parameters, prefills the prompt, decodes with a KV cache.

    python sample.py --rundir=runs/shakespeare_char
    python sample.py --rundir=runs/shakespeare_char --start="ROMEO:" --temperature=0 --num_samples=1
    python sample.py --rundir=runs/owt --start=FILE:prompt.txt --top_p=0.9 --checkpoint=best
    python sample.py --benchmark          # tokens/s of cached vs naive decoding (BENCHMARKS.md)

Only the samples go to stdout, each followed by a line of dashes (as in nanoGPT), so the output
can be piped; progress goes to stderr. The tokenizer comes from the run's data directory.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import data
from data import ArgumentParser, UserError
from model import GPT, GPTConfig, cast_floats, generate, sample_token, with_config

SEPARATOR = "---------------"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Generation may run past the model's block_size: when the cache is full it is "
        "rebuilt from the most recent block_size//2 tokens and decoding goes on, so from then on "
        "the model sees between block_size/2 and block_size tokens of context. A prompt longer "
        "than block_size is cut to its last block_size tokens.",
    )
    parser.add_argument("--rundir", help="a run directory made by launch.py (required)")
    parser.add_argument("--start", default="\n",
                        help='the prompt, or FILE:path to read it from a file (default "\\n")')
    parser.add_argument("--num_samples", type=int, default=3, help="samples to draw (default 3)")
    parser.add_argument("--max_new_tokens", type=int, default=500,
                        help="tokens generated per sample (default 500)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0 is greedy (argmax) (default 0.8)")
    parser.add_argument("--top_k", type=int, default=0,
                        help="sample among the k most likely tokens only; 0 is off (default 0)")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="sample among the smallest set of tokens with probability mass >= p; "
                        "1 is off (default 1.0)")
    parser.add_argument("--seed", type=int, default=1337,
                        help="the same seed gives the same samples (default 1337)")
    parser.add_argument("--checkpoint", default="latest",
                        help="latest, best (lowest val loss) or a step number (default latest)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                        help="compute dtype (default: the run's model.compute_dtype)")
    parser.add_argument("--benchmark", action="store_true",
                        help="measure tokens/s of cached vs naive decoding on a random-init "
                        "shakespeare_char-shaped model (no --rundir; uses --max_new_tokens and "
                        "--dtype, default float32) and exit")
    args = parser.parse_args(argv)
    if not args.benchmark and not args.rundir:
        raise UserError("say which run to sample from: --rundir=RUN (a directory made by launch.py)")
    for name, ok, rule in [
        ("num_samples", args.num_samples >= 1, ">= 1"),
        ("max_new_tokens", args.max_new_tokens >= 0, ">= 0"),
        ("temperature", args.temperature >= 0, ">= 0"),
        ("top_k", args.top_k >= 0, ">= 0"),
        ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
    ]:
        if not ok:
            raise UserError(f"--{name}={getattr(args, name)}: must be {rule}")
    return args


def status(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_prompt(start: str) -> str:
    text = data.read_text(start[len("FILE:"):]) if start.startswith("FILE:") else start
    if not text:
        raise UserError("the prompt is empty: pass --start with at least one character")
    return text


def load_tokenizer(data_dir: str, rundir: str):
    try:
        meta = data.load_meta(data_dir)
    except UserError as e:
        raise UserError(f"{e} (sample.py reads the tokenizer from {rundir}'s data directory "
                        f"{data_dir}; a relative path is relative to where you run it)") from None
    return data.load_tokenizer(meta), meta


@eqx.filter_jit
def generate_samples(model: GPT, prompt, keys, max_new_tokens, temperature, top_k, top_p,
                     vocab_limit):
    """(num_samples, max_new_tokens) ids: one compiled program, the samples vmapped."""
    def one(key):
        return generate(model, prompt, key, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, vocab_limit=vocab_limit)

    return jax.vmap(one)(keys)


def sample_keys(seed: int, num_samples: int):
    # fold_in: sample i is the same whatever num_samples is
    return jax.vmap(lambda i: jr.fold_in(jr.key(seed), i))(jnp.arange(num_samples))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.benchmark:
        return benchmark(args.max_new_tokens, args.dtype or "float32")
    import train  # here: --benchmark and --help need neither orbax nor the training code

    config = train.read_run_config(Path(args.rundir))
    tokenizer, meta = load_tokenizer(config.data_dir, args.rundir)
    prompt = tokenizer.encode(read_prompt(args.start))  # UserError naming unknown characters
    if len(prompt) == 0:
        raise UserError("the prompt encodes to no tokens: pass a longer --start")

    _, model = train.load_model(args.rundir, args.checkpoint)
    if args.dtype and args.dtype != model.config.compute_dtype:
        model = with_config(model, dataclasses.replace(model.config, compute_dtype=args.dtype))
    status(f"sampling {args.num_samples} x {args.max_new_tokens} tokens from {args.rundir} "
           f"(checkpoint {args.checkpoint}, {model.config.compute_dtype}, prompt of {len(prompt)} "
           f"tokens, block_size {model.config.block_size})")

    t0 = time.perf_counter()
    # a vocab_size rounded up past the tokenizer's (GPT-2: 50257 -> 50304) must not be sampled
    vocab_limit = meta["vocab_size"] if meta["vocab_size"] < model.config.vocab_size else None
    keys = sample_keys(args.seed, args.num_samples)
    ids = generate_samples(model, jnp.asarray(prompt, jnp.int32), keys, args.max_new_tokens,
                           args.temperature, args.top_k, args.top_p, vocab_limit)
    ids = jax.device_get(ids)
    seconds = time.perf_counter() - t0
    for row in ids:
        print(tokenizer.decode(prompt + [int(i) for i in row]))
        print(SEPARATOR, flush=True)
    status(f"{ids.size} tokens in {seconds:.1f}s, compilation included")


# ---------------------------------------------------------------------------------------------
# Benchmark: cached decoding against rerunning the whole context for every token


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
        logits = model(window)[length - 1]
        token = sample_token(logits, step_key, temperature, top_k, top_p)
        full = length == block  # slide by one, like nanoGPT's idx[:, -block_size:]
        window = jnp.where(full, jnp.roll(window, -1), window)
        window = window.at[jnp.where(full, block - 1, length)].set(token)
        return (window, jnp.minimum(length + 1, block)), token

    carry = (window, jnp.int32(prompt.shape[0]))
    _, tokens = jax.lax.scan(step, carry, jr.split(key, max_new_tokens))
    return tokens


def benchmark(max_new_tokens: int = 500, dtype: str = "float32") -> dict:
    """Tokens/s of generate vs naive_generate, num_samples=1, the shakespeare_char shape (random
    init); the first call of each compiles and is not timed."""
    config = GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384,
                       compute_dtype=dtype)
    model = GPT(config, key=jr.key(0))
    prompt = jnp.zeros(1, jnp.int32)
    cached = eqx.filter_jit(lambda m, k: generate(m, prompt, k, max_new_tokens, temperature=0.8))
    naive = eqx.filter_jit(lambda m, k: naive_generate(m, prompt, k, max_new_tokens, 0.8))
    results = {}
    for name, fn in (("cached", cached), ("naive", naive)):
        jax.block_until_ready(fn(model, jr.key(0)))  # compile
        t0 = time.perf_counter()
        jax.block_until_ready(fn(model, jr.key(1)))
        results[name] = max_new_tokens / (time.perf_counter() - t0)
        status(f"{name}: {results[name]:.1f} tokens/s")
    status(f"cached / naive: {results['cached'] / results['naive']:.1f}x "
           f"({max_new_tokens} new tokens, {dtype}, {jax.devices()[0].device_kind})")
    return results


if __name__ == "__main__":
    data.run_cli(main)
