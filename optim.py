"""The optimizer: which array gets which update (labels), the learning-rate schedule, Muon and
its view of q, k and v, and make_optimizer, which chains them. "Change the optimizer" is this file,
as "change the model" is model.py; train.py only calls make_optimizer and lr_schedule.

AdamW everywhere by default, decay on matrices only; with optimizer="muon", the blocks' matrices
take Muon (Jordan et al. 2024) and the rest AdamW, all under one warmup + cosine schedule. The
speedrun's later steps (KellerJordan/modded-nanogpt) that paid are switches (BENCHMARKS.md "The
recipe's third round"). Under float16 compute, the chain is wrapped in dynamic loss scaling.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from config import TrainConfig
from model import in_block_stack, names_on


def optimizer_labels(config: TrainConfig):
    """A function of the params: 'muon' for the blocks' matrices when config.optimizer is "muon",
    'decay' for every other matrix (ndim >= 2 in the unstacked model), 'no_decay' for norm gains
    and biases. A GPT is itself callable, so optax needs a function here, not a tree."""

    def label(path, leaf):
        if leaf.ndim - in_block_stack(path) < 2:
            return "no_decay"
        return "muon" if config.optimizer == "muon" and in_block_stack(path) else "decay"

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


def lr_schedule(config: TrainConfig) -> optax.Schedule:
    decay_steps = config.lr_decay_steps or config.max_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(decay_steps, config.warmup_steps + 1),
        end_value=config.min_lr,
    )


def muon(config: TrainConfig) -> optax.GradientTransformation:
    """Muon (Jordan et al. 2024): Nesterov momentum, orthogonalised by Newton-Schulz, per layer.

    Each leaf is (n_layer, d_in, d_out): the layer axis is a batch axis, so every layer's matrix
    is orthogonalised on its own, and q, k and v each on their own (split_qkv). Updates are
    scaled by sqrt(max(1, d_out/d_in)), as Muon's reference does, so wide and tall matrices take
    comparable steps. Switches: AOL's first step, NorMuon.
    """
    per_layer = lambda updates: jax.tree.map(  # noqa: E731
        lambda _: optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2), updates)
    by_shape = lambda updates, params=None: jax.tree.map(  # noqa: E731
        lambda u: u * math.sqrt(max(1.0, u.shape[-1] / u.shape[-2])), updates)
    momentum = optax.contrib.scale_by_muon(
        beta=config.muon_momentum, ns_steps=config.muon_ns_steps, nesterov=True,
        weight_dimension_numbers=per_layer, preconditioning=config.muon_preconditioning)
    normed = [normuon(config.normuon_beta2)] if config.normuon else []
    return split_qkv(optax.chain(momentum, *normed, optax.stateless(by_shape)))


class NorMuonState(NamedTuple):
    nu: optax.Updates  # each neuron's mean square of the orthogonalised update, decayed


def normuon_axis(a) -> int:
    """The axis NorMuon averages over: the shorter side (along it an orthogonalised matrix's rows
    all have norm 1 already), the input side of a square one; one statistic per neuron of the
    longer side."""
    return -1 if a.shape[-2] > a.shape[-1] else -2


def normuon(beta2: float, eps: float = 1e-10) -> optax.GradientTransformation:
    """NorMuon (Li et al. 2025), as the speedrun runs it: each neuron's slice of the orthogonalised
    update divided by the root of its decayed mean square, then the matrix scaled back to the
    Frobenius norm it had, so Muon's learning rate keeps its meaning."""

    def init(params):
        stat = lambda p: jnp.zeros(p.shape[:-2] + tuple(  # noqa: E731
            1 if a == p.ndim + normuon_axis(p) else p.shape[a] for a in range(p.ndim - 2, p.ndim)))
        return NorMuonState(jax.tree.map(stat, params))

    def one(u, nu):
        mean_square = jnp.mean(jnp.square(u), axis=normuon_axis(u), keepdims=True)
        nu = beta2 * nu + (1 - beta2) * mean_square
        normed = u * jax.lax.rsqrt(jnp.maximum(nu, eps))
        norm = lambda a: jnp.sqrt(jnp.sum(jnp.square(a), axis=(-2, -1), keepdims=True))  # noqa: E731
        return normed * (norm(u) / jnp.maximum(norm(normed), eps)), nu

    def update(updates, state, params=None):
        out = jax.tree.map(one, updates, state.nu)
        pick = lambda i: jax.tree.map(lambda _, pair: pair[i], updates, out)  # noqa: E731
        return pick(0), NorMuonState(pick(1))

    return optax.GradientTransformation(init, update)


def split_qkv(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """inner sees each fused (layer, d, 3d) qkv array as (3 * layer, d, d): q, k and v apart.
    They are three maps, not one: orthogonalised apart they train to a lower loss on both corpora
    and seeds (BENCHMARKS.md "Muon")."""

    def apart(path, a):
        if "qkv" not in names_on(path):
            return a
        layers, d_in, d_out = a.shape
        return a.reshape(layers, d_in, 3, d_out // 3).swapaxes(1, 2).reshape(-1, d_in, d_out // 3)

    def fused(path, a, like):
        if "qkv" not in names_on(path):
            return a
        layers, d_in, d_out = like.shape
        return a.reshape(layers, 3, d_in, d_out // 3).swapaxes(1, 2).reshape(like.shape)

    view = lambda tree: jax.tree_util.tree_map_with_path(apart, tree)  # noqa: E731

    def update(updates, state, params=None):
        new, state = inner.update(view(updates), state, None if params is None else view(params))
        return jax.tree_util.tree_map_with_path(fused, new, updates), state

    return optax.GradientTransformation(lambda params: inner.init(view(params)), update)


class LossScaleState(NamedTuple):
    scale: jax.Array  # the loss is multiplied by it before the backward pass (train.py)
    good_steps: jax.Array  # finite steps in a row since the scale last changed
    guarded: optax.ApplyIfFiniteState  # the optimizer's own state; total_notfinite: steps skipped


def dynamic_loss_scale(inner: optax.GradientTransformation, init_scale: float,
                       growth_interval: int) -> optax.GradientTransformation:
    """float16's dynamic loss scaling (Micikevicius et al. 2018; torch's GradScaler): the train
    step scales the loss by state.scale, so small gradients do not flush to zero in float16,
    and hands over the gradients unscaled again. A step whose gradients are not finite (the
    scaled backward overflowed) is skipped, params and inner state unchanged (optax's
    apply_if_finite), and the scale halved; growth_interval finite steps in a row double it."""
    guarded = optax.apply_if_finite(inner, max_consecutive_errors=2**31 - 1)  # never gives in

    def init(params):
        return LossScaleState(jnp.asarray(init_scale, jnp.float32), jnp.zeros([], jnp.int32),
                              guarded.init(params))

    def update(grads, state, params=None):
        updates, inner_state = guarded.update(grads, state.guarded, params)
        finite = inner_state.last_finite
        grow = finite & (state.good_steps + 1 >= growth_interval)
        doubled = jnp.where(jnp.isfinite(2 * state.scale), 2 * state.scale, state.scale)
        scale = jnp.where(finite, jnp.where(grow, doubled, state.scale), state.scale / 2)
        good_steps = jnp.where(finite & ~grow, state.good_steps + 1, 0)
        return updates, LossScaleState(scale, good_steps, inner_state)

    return optax.GradientTransformation(init, update)


def loss_scale(opt_state) -> jax.Array | None:
    """The scale to multiply the loss by, or None where there is no loss scaling."""
    return opt_state.scale if isinstance(opt_state, LossScaleState) else None


def loss_scale_metrics(opt_state: LossScaleState) -> dict:
    """After a step: the scale the next one uses, whether this one was skipped, skips so far."""
    return {"loss_scale": opt_state.scale, "skipped": ~opt_state.guarded.last_finite,
            "skipped_steps": opt_state.guarded.total_notfinite}


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """clip -> per label: Adam (or Muon) and decoupled weight decay -> scale by the scheduled lr;
    under float16 compute, all of it inside dynamic loss scaling.

    One schedule for all: Muon's peak lr enters as its ratio to AdamW's, so both follow the same
    warmup and cosine, and weight decay is weight_decay * lr(t) of each one's own lr.
    """
    # Independent decay (Wortsman et al. 2023, "Small-scale proxies") wants weight_decay *
    # lr(t)/peak instead of weight_decay * lr(t): a constant divided by the peak.
    adam_decay = muon_decay = config.weight_decay
    if config.independent_weight_decay:
        adam_decay = config.weight_decay / config.learning_rate
        muon_decay = config.weight_decay / config.muon_learning_rate
    adam = optax.scale_by_adam(b1=config.beta1, b2=config.beta2)
    transforms = {"decay": optax.chain(adam, optax.add_decayed_weights(adam_decay)),
                  "no_decay": adam}
    if config.optimizer == "muon":
        transforms["muon"] = optax.chain(muon(config), optax.add_decayed_weights(muon_decay),
                                         optax.scale(config.muon_learning_rate / config.learning_rate))
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    by_label = optax.multi_transform(transforms, optimizer_labels(config))
    chained = optax.chain(clip, by_label, optax.scale_by_learning_rate(lr_schedule(config)))
    if config.model.compute_dtype != "float16":  # bfloat16 has float32's range: nothing to scale
        return chained
    return dynamic_loss_scale(chained, config.loss_scale_init, config.loss_scale_growth_interval)
