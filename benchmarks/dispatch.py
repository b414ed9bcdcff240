"""What one call of the train step costs the host besides its computation: a step that does no
work (returns its inputs and one sum) on shakespeare_char_cpu's model and optimizer state, called
through eqx.filter_jit(donate="all") (the step before BENCHMARKS.md round 6) and through jax.jit
on the model's arrays (the step now). 500 calls, twice each.

    python benchmarks/dispatch.py [--config=NAME] [overrides]    # needs the config's data prepared
"""

import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from config import TrainConfig, with_data_vocab  # noqa: E402
from sharding import make_mesh  # noqa: E402


def no_work(model, opt_state, tokens, targets, step, key_data):
    return model, opt_state, {"loss": jnp.sum(tokens) + step}


def microseconds_per_call(call, calls: int = 500) -> float:
    jax.block_until_ready(call())
    start = time.perf_counter()
    for _ in range(calls):
        out = call()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls * 1e6


def main(argv):
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "shakespeare_char_cpu")
    config = cli.apply_overrides(cli.load_config(name, TrainConfig),
                                 [a for a in argv if not a.startswith("--config=")])
    config = with_data_vocab(config, data.load_meta(config.data_dir))
    abstract_params, abstract_opt, static, optimizer = train.abstract_state(config, make_mesh(config))
    tokens = np.zeros((config.grad_accum, config.batch_size, config.model.block_size), np.int32)
    key_data, step = np.zeros(2, np.uint32), np.int32(3)

    filtered = eqx.filter_jit(no_work, donate="all")
    state = list(train.init_state(config, abstract_params, abstract_opt, optimizer))
    state[0] = eqx.combine(state[0], static)

    def through_filter_jit():
        state[0], state[1], metrics = filtered(*state, tokens, tokens, step, key_data)
        return metrics

    def on_arrays(params, opt_state, tokens, targets, step, key_data):
        model, opt_state, metrics = no_work(eqx.combine(params, static), opt_state, tokens,
                                            targets, step, key_data)
        return eqx.filter(model, eqx.is_array), opt_state, metrics

    arrays = list(train.init_state(config, abstract_params, abstract_opt, optimizer))
    on_arrays_donating = jax.jit(on_arrays, donate_argnums=(0, 1))

    def through_jax_jit():
        arrays[0], arrays[1], metrics = on_arrays_donating(*arrays, tokens, tokens, step, key_data)
        return metrics

    leaves = len(jax.tree.leaves((state[0], state[1])))
    for _ in range(2):
        print(f"{name}, {leaves} arrays in: eqx.filter_jit {microseconds_per_call(through_filter_jit):.0f} "
              f"us/call, jax.jit on the arrays {microseconds_per_call(through_jax_jit):.0f} us/call")


if __name__ == "__main__":
    main(sys.argv[1:])
