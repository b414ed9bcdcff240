"""Each GPU trick of model.py measured on its own: the step with one trick taken back at a time.

    python benchmarks/gpu_variants.py --shape=gpt2 --data_dir=data/shakespeare
    python benchmarks/gpu_variants.py --shape=shakespeare_char --data_dir=data/shakespeare_char
    python benchmarks/gpu_variants.py --shape=gpt2 --determinism   # bitwise repeatability

A variant swaps one function of model.py for the plain version it replaced (the scatter-add
embedding gradient, float32 logits with optax's loss) or flips a config switch, then times the
same train_step as bench.py on the same real-text batches. Written for BENCHMARKS.md; it is not
part of the library. --determinism runs a few steps twice from the same state and compares the
parameters bit for bit.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import data  # noqa: E402
import measure  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
from config import TrainConfig  # noqa: E402
from sharding import batch_sharding, make_mesh  # noqa: E402

SHAPES = {  # config file, overrides
    "gpt2": ("openwebtext", dict(batch_size=32, grad_accum=1)),
    "shakespeare_char": ("shakespeare_char", {}),
}


# ---- The plain versions that model.py's tricks replaced


def embed_scatter_add(table, tokens):  # autodiff's own gradient: a scatter-add with atomics
    return table[tokens]


@jax.custom_vjp
def embed_segment_sum(table, tokens):  # sorted segment_sum: fast, but still atomics
    return table[tokens]


def _segment_fwd(table, tokens):
    return table[tokens], (table, tokens)


def _segment_bwd(residuals, grad):
    table, tokens = residuals
    ids, rows = tokens.reshape(-1), grad.reshape(-1, grad.shape[-1])
    order = jnp.argsort(ids)
    sums = jax.ops.segment_sum(rows[order], ids[order], table.shape[0], indices_are_sorted=True)
    return sums.astype(table.dtype), None


embed_segment_sum.defvjp(_segment_fwd, _segment_bwd)


@jax.custom_vjp
def embed_one_hot(table, tokens):  # a matmul with the one-hot tokens: fine for small vocabs
    return table[tokens]


def _one_hot_bwd(residuals, grad):
    table, tokens = residuals
    one_hot = jax.nn.one_hot(tokens.reshape(-1), table.shape[0], dtype=grad.dtype)
    grad = grad.reshape(-1, grad.shape[-1])
    return jnp.matmul(one_hot.T, grad, preferred_element_type=jnp.float32).astype(table.dtype), None


embed_one_hot.defvjp(_segment_fwd, _one_hot_bwd)


def logits_float32(self, x):  # the head's output in float32: its gradient matmuls run in TF32
    head = self.embed.T if self.lm_head is None else self.lm_head
    return jnp.matmul(x, head.astype(x.dtype), preferred_element_type=jnp.float32)


def cross_entropy_optax(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def dropout_rbg(x, rate, key, impl="rbg"):  # masks from XLA's RngBitGenerator, not threefry
    if key is None or rate == 0.0:
        return x
    rbg_key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=impl)
    keep = jax.random.bernoulli(rbg_key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def dropout_unsafe_rbg(x, rate, key):
    return dropout_rbg(x, rate, key, impl="unsafe_rbg")


def dropout_bits(x, rate, key):  # threefry bits compared with an integer threshold: no floats
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bits(key, x.shape, jnp.uint32) >= jnp.uint32(round(rate * 2**32))
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), 0).astype(x.dtype)


def rmsnorm_apply_in_compute_dtype(self, x):  # float32 statistics, the scaling in bf16
    x32 = x.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return x * scale.astype(x.dtype) * self.weight.astype(x.dtype)


def apply_rope_without_concatenates(x, cos, sin):  # the halves as an axis of 2, reversed
    seq, heads, head_dim = x.shape
    half = head_dim // 2
    pairs = x.astype(jnp.float32).reshape(seq, heads, 2, half)  # [x1, x2]
    rotated = pairs[:, :, ::-1, :] * jnp.array([-1.0, 1.0])[:, None]  # [-x2, x1]: rotate_half(x)
    cos, sin = cos[:, None, None, :half], sin[:, None, None, :half]  # the table repeats its halves
    return (pairs * cos + rotated * sin).reshape(x.shape).astype(x.dtype)


PATCHES = {
    "embed=scatter-add": {"embed": embed_scatter_add},
    "embed=segment_sum": {"embed": embed_segment_sum},
    "embed=one-hot": {"embed": embed_one_hot},
    "logits=float32": {"GPT.logits": logits_float32, "cross_entropy": cross_entropy_optax},
    "dropout=rbg": {"dropout": dropout_rbg},
    "dropout=unsafe_rbg": {"dropout": dropout_unsafe_rbg},
    "dropout=bits": {"dropout": dropout_bits},
    "norm=bf16-apply": {"RMSNorm.__call__": rmsnorm_apply_in_compute_dtype},
    "rope=no-concatenate": {"apply_rope": apply_rope_without_concatenates},
}


def patched(names: list[str]):
    """Applies the named patches to the model module; returns a function that undoes them."""
    undo = []
    for name in names:
        for attr, fn in PATCHES[name].items():
            owner = model  # "Class.method" patches a method of model.Class
            if "." in attr:
                class_name, attr = attr.split(".")
                owner = getattr(model, class_name)
            undo.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, fn)

    def restore():
        for owner, attr, fn in reversed(undo):
            setattr(owner, attr, fn)

    return restore


def config_for(shape: str, changes: dict, data_dir: str) -> TrainConfig:
    name, base = SHAPES[shape]
    config = measure.with_vocab(dataclasses.replace(cli.load_config(name, TrainConfig), **base),
                                data_dir)
    model_changes = {k[len("model."):]: v for k, v in changes.items() if k.startswith("model.")}
    other = {k: v for k, v in changes.items() if not k.startswith("model.")}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **model_changes),
                               **other)


def parse_variant(spec: str) -> tuple[list[str], dict]:
    """'embed=segment_sum+model.unroll_layers=False' -> (patches, config changes)."""
    patches, changes = [], {}
    for part in filter(None, spec.split("+")):
        if part in PATCHES:
            patches.append(part)
        else:
            key, value = part.split("=")
            changes[key] = {"True": True, "False": False}.get(value, value)
            for kind in (int, float):
                try:
                    changes[key] = kind(value)
                    break
                except ValueError:
                    pass
    return patches, changes


def time_variants(shape, variants, data_dir, tokens, steps, warmup):
    rows = []
    for spec in variants:
        patches, changes = parse_variant(spec)
        restore = patched(patches)
        try:
            result = measure.benchmark(config_for(shape, changes, data_dir), steps, warmup, tokens)
        finally:
            restore()
        rows.append((spec or "all tricks", result["ms_per_step"], result["compile_s"],
                     result["loss"]))
        print(f"{rows[-1][0]:55s} {result['ms_per_step']:8.2f} ms/step  compile "
              f"{result['compile_s']:5.1f}s  loss {result['loss']:.4f}", flush=True)
    return rows


def params_after(config, tokens, steps):
    mesh = make_mesh(config)
    params, opt_state, train_step = train.new_state_and_step(config, mesh)
    sampler = data.BatchSampler(tokens, config.model.block_size, config.batch_size, 1,
                                      seed=1337)
    key_data = np.asarray([0, 7], np.uint32)
    sharding = batch_sharding(mesh)
    for step in range(steps):
        x, y = (jax.device_put(a, sharding) for a in sampler.batch(step))
        params, opt_state, _ = train_step(params, opt_state, x, y, np.int32(step), key_data)
    return [np.asarray(a) for a in jax.tree.leaves(params)]


def determinism(shape, variants, data_dir, tokens, steps=3):
    for spec in variants:
        patches, changes = parse_variant(spec)
        restore = patched(patches)
        try:
            config = config_for(shape, changes, data_dir)
            a, b = params_after(config, tokens, steps), params_after(config, tokens, steps)
        finally:
            restore()
        diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
        same = all(np.array_equal(x, y) for x, y in zip(a, b))
        print(f"determinism {spec or 'all tricks':45s} {steps} steps twice: "
              f"{'bitwise equal' if same else f'DIFFERENT, max |diff| {diff:.3g}'}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=tuple(SHAPES), default="gpt2")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--determinism", action="store_true")
    p.add_argument("variants", nargs="*", help="e.g. '' 'embed=scatter-add' "
                   "'model.unroll_layers=False' 'logits=float32+embed=scatter-add'")
    args = p.parse_args()
    tokens, source = measure.token_stream(config_for(args.shape, {}, args.data_dir),
                                         args.data_dir)
    print(f"{args.shape} on {jax.devices()[0].device_kind}, jax {jax.__version__}, tokens from "
          f"{source}", flush=True)
    variants = args.variants or [""]
    if args.determinism:
        determinism(args.shape, variants, args.data_dir, tokens)
    else:
        time_variants(args.shape, variants, args.data_dir, tokens, args.steps, args.warmup)


if __name__ == "__main__":
    main()
