"""The config's train step against variants of it, in one process, drift cancelled: each variant
is compiled (its own config overrides, its own XLA compiler options), then every round runs 20
steps of each in turn, the order reversed every other round (A B, B A, ...). These VMs' steps
drift by up to 1.4x within the hour, and a separate process per variant, or the same order every
round, measures the hour as much as the variant (BENCHMARKS.md round 12).

    python benchmarks/step_ab.py --variant "no remat=--model.remat=false"
    python benchmarks/step_ab.py --rounds=30 \\
        --variant "YNNPACK dots=xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"

A variant is NAME=ITEMS: items that start with -- override the config (as launch.py's), the
others are compiler options (an XLA debug option's name=value). Prints each round's ms/step,
then each variant's median, its median ratio to the config round by round, the rounds it was
the faster in, and its loss after the last step (the same batches for all: a variant that only
reorders arithmetic ends within rounding of the config). The batches are bench.py's (measure.py):
the config's prepared data, else a Zipf stream, and the output says which.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.random as jr
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import data  # noqa: E402
import measure  # noqa: E402
import train  # noqa: E402
from config import TrainConfig  # noqa: E402
from sharding import make_mesh  # noqa: E402

STEPS_PER_TURN = 20


def option_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def compiled_variant(base: TrainConfig, items: list[str], batch):
    """(compiled step, params, opt_state) of the config with items applied."""
    overrides = [item for item in items if item.startswith("--")]
    options = dict(item.split("=", 1) for item in items if not item.startswith("--"))
    config = cli.apply_overrides(base, overrides)
    params, opt_state, step = train.new_state_and_step(config, make_mesh(config))
    lowered = step.lower(params, opt_state, *batch, np.int32(0), jr.key_data(jr.key(0)))
    start = time.perf_counter()
    compiled = lowered.compile({k: option_value(v) for k, v in options.items()} or None)
    print(f"compiled in {time.perf_counter() - start:.1f}s", end="")
    return compiled, params, opt_state


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shakespeare_char_cpu")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ITEMS",
                        help="a variant of the config's step, repeatable")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)

    base = measure.with_vocab(cli.load_config(args.config, TrainConfig), None)
    tokens, source = measure.token_stream(base, None)
    print(f"tokens from {source}")
    sampler = data.BatchSampler(tokens, base.model.block_size, base.batch_size, base.grad_accum,
                                seed=1337)
    batches = [tuple(map(jax.numpy.asarray, sampler.batch(i))) for i in range(2 * STEPS_PER_TURN)]
    key_data = jr.key_data(jr.key(0))

    variants = {}
    for spec in ["the config=", *args.variant]:
        name, _, items = spec.partition("=")
        print(f"{name}: ", end="", flush=True)
        variants[name] = list(compiled_variant(base, shlex.split(items), batches[0]))
        print()
    names = list(variants)
    ms = {name: [] for name in names}
    loss = {}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            step, params, opt_state = variants[name]
            start = time.perf_counter()
            for i in range(STEPS_PER_TURN):
                params, opt_state, metrics = step(params, opt_state, *batches[i],
                                                  np.int32(round_ * STEPS_PER_TURN + i), key_data)
            jax.block_until_ready(params)
            ms[name].append((time.perf_counter() - start) / STEPS_PER_TURN * 1e3)
            variants[name][1:] = params, opt_state
            loss[name] = float(metrics["loss"])
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {ms[n][-1]:.1f}" for n in names), flush=True)

    print(f"\n{args.rounds} rounds of {STEPS_PER_TURN} steps, ms/step:")
    reference = np.array(ms[names[0]])
    for name in names:
        ratio = np.array(ms[name]) / reference
        print(f"{name}: median {np.median(ms[name]):.1f} ms, {np.median(ratio):.3f}x the config's "
              f"(faster in {int((ratio < 1).sum())} of {args.rounds} rounds), "
              f"loss at the last step {loss[name]:.6f}")


if __name__ == "__main__":
    main(sys.argv[1:])
