"""The model: shapes, causality, RoPE, switches, the scan, precision, counts, learning."""

import dataclasses
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from model import (GPT, GPTConfig, apply_rope, cross_entropies, cross_entropy, dropout, embed,
                   empty_cache, extend, flops_per_token, loss_fn, multi_token_loss, num_params,
                   rope_table, scatter_rows_by_id, sum_rows_by_id)

# Small shapes keep the suite fast on 2 CPU cores; float32 compute for exact comparisons.
TINY = GPTConfig(
    block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=64, compute_dtype="float32"
)


# Jitted entry points: op-by-op dispatch is several times slower than one compile on CPU.
forward = eqx.filter_jit(lambda model, tokens, key=None: model(tokens, key=key))
value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))


def tiny(**changes) -> GPTConfig:
    return dataclasses.replace(TINY, **changes)


# The speedrun's shortcuts all at once, on five blocks: blocks 0 and 3 share a value table, 1
# and 4 another, 2 its own.
SHORTCUTS = dict(value_embeds=True, bigram_embed=True, tie_embeddings=False, n_layer=5)


def random_tokens(key, shape, vocab=TINY.vocab_size):
    return jr.randint(key, shape, 0, vocab)


def test_output_shape_and_dtype_in_both_compute_dtypes():
    tokens = random_tokens(jr.key(1), (TINY.block_size,))
    for dtype in ("float32", "bfloat16"):
        model = GPT(tiny(compute_dtype=dtype), key=jr.key(0))
        logits = forward(model, tokens)
        assert logits.shape == (TINY.block_size, TINY.vocab_size)
        assert logits.dtype == jnp.float32
        # parameters stay float32 whatever the compute dtype
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


def test_loss_at_init_is_close_to_uniform():
    # Logits at init have std 0.02*sqrt(n_embd), which adds ~std^2/2 nats over ln(vocab):
    # 0.077 at the shakespeare_char width used here, so within the 0.1 asked for.
    config = tiny(n_embd=384, n_head=6, block_size=64)
    model = GPT(config, key=jr.key(0))
    tokens = random_tokens(jr.key(1), (8, config.block_size))
    targets = random_tokens(jr.key(2), (8, config.block_size))
    loss = loss_fn(model, tokens, targets)
    assert loss.dtype == jnp.float32
    assert abs(float(loss) - math.log(config.vocab_size)) < 0.1


def test_causality_future_tokens_do_not_change_past_logits():
    model = GPT(TINY, key=jr.key(0))
    tokens = random_tokens(jr.key(1), (TINY.block_size,))
    t = 11
    changed = tokens.at[t + 1 :].set((tokens[t + 1 :] + 7) % TINY.vocab_size)
    before, after = forward(model, tokens), forward(model, changed)
    np.testing.assert_allclose(before[: t + 1], after[: t + 1], atol=1e-6, rtol=0)
    assert not np.allclose(before[t + 1 :], after[t + 1 :], atol=1e-3)  # the test can fail


def test_rope_scores_depend_only_on_relative_position():
    head_dim, shift = 16, 37
    q = jr.normal(jr.key(0), (1, 1, head_dim))
    k = jr.normal(jr.key(1), (1, 1, head_dim))

    def score(q_pos, k_pos):
        q_rot = apply_rope(q, *rope_table(jnp.array([q_pos]), head_dim, 10000.0))
        k_rot = apply_rope(k, *rope_table(jnp.array([k_pos]), head_dim, 10000.0))
        return float(jnp.sum(q_rot * k_rot))

    np.testing.assert_allclose(score(5, 2), score(5 + shift, 2 + shift), rtol=1e-5)
    np.testing.assert_allclose(score(9, 9), score(9 + shift, 9 + shift), rtol=1e-5)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # the position does matter


def test_qk_norm_switch_changes_parameters_and_output():
    tokens = random_tokens(jr.key(1), (TINY.block_size,))
    with_norm = GPT(tiny(qk_norm=True), key=jr.key(0))
    without = GPT(tiny(qk_norm=False), key=jr.key(0))
    assert without.blocks.attn.q_norm is None
    assert with_norm.blocks.attn.q_norm.weight.shape == (TINY.n_layer, TINY.head_dim)
    assert num_params(with_norm) - num_params(without) == 2 * TINY.n_layer * TINY.head_dim
    assert not np.allclose(forward(with_norm, tokens), forward(without, tokens), atol=1e-3)


def test_tied_embeddings_are_one_array_and_untied_are_two():
    tied = GPT(tiny(tie_embeddings=True), key=jr.key(0))
    untied = GPT(tiny(tie_embeddings=False), key=jr.key(0))
    assert tied.lm_head is None  # nothing that could drift apart from embed
    assert untied.lm_head.shape == (TINY.n_embd, TINY.vocab_size)
    assert num_params(untied) - num_params(tied) == TINY.vocab_size * TINY.n_embd
    # In the tied model the embedding gets gradient through both of its uses.
    tokens = jnp.zeros((1, 8), jnp.int32)  # only row 0 is looked up
    targets = jnp.full((1, 8), 5)
    _, grads = value_and_grad(tied, tokens, targets)
    assert float(jnp.abs(grads.embed[5]).sum()) > 0  # through the head only
    assert float(jnp.abs(grads.embed[0]).sum()) > 0  # through the lookup (and the head)


def test_scan_over_blocks_equals_a_python_loop():
    model = GPT(TINY, key=jr.key(0))
    tokens = random_tokens(jr.key(1), (TINY.block_size,))
    cos, sin = rope_table(jnp.arange(TINY.block_size), TINY.head_dim, TINY.rope_base)
    x = model.embed[tokens]
    params, static = eqx.partition(model.blocks, eqx.is_array)
    for layer in range(TINY.n_layer):
        block = eqx.combine(jax.tree.map(lambda a: a[layer], params), static)
        x, _ = block(x, cos, sin)  # no cache: None comes back
    looped = model.logits(model.final_norm(x))
    np.testing.assert_allclose(forward(model, tokens), looped, atol=1e-5, rtol=1e-5)


def written_out(model: GPT, tokens):
    """The default architecture (RoPE, RMSNorm, QK-norm, GELU, tied head) in plain jnp, one layer
    at a time, straight from the parameters: nothing shared with model.py's blocks. With the
    speedrun's shortcuts as its train_gpt.py writes them (KellerJordan/modded-nanogpt)."""
    c, seq = model.config, tokens.shape[0]
    def rms(x, gain):
        return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + c.norm_eps) * gain

    frequencies = c.rope_base ** (-jnp.arange(0, c.head_dim, 2) / c.head_dim)
    angles = jnp.arange(seq)[:, None, None] * frequencies  # (seq, 1, head_dim/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)

    def rope(t):  # rotate each pair (t_i, t_{i + head_dim/2}) by its angle
        a, b = jnp.split(t, 2, axis=-1)
        return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    x = model.embed[tokens]
    if c.bigram_embed:  # a row for each (token before, token); the first has none before it
        for t in range(seq):
            before = int(tokens[t - 1]) if t > 0 else -1
            x = x.at[t].add(model.bigram_embed[(before + 1) * c.vocab_size + int(tokens[t])])
    for i in range(c.n_layer):
        b = jax.tree.map(lambda a: a[i], model.blocks)
        qkv = rms(x, b.attn_norm.weight) @ b.attn.qkv.weight
        q, k, v = (t.reshape(seq, c.n_head, c.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        if c.value_embeds:  # tables 0 1 ... 0 1 ...: block i and block i + n_layer/2 share one
            table = model.value_embeds[i % ((c.n_layer + 1) // 2)]
            v = b.attn.value_lambdas[0] * v + b.attn.value_lambdas[1] * table[tokens].reshape(v.shape)
        q, k = rope(rms(q, b.attn.q_norm.weight)), rope(rms(k, b.attn.k_norm.weight))
        scores = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(c.head_dim)
        scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -jnp.inf)
        y = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + y.reshape(seq, c.n_embd) @ b.attn.proj.weight
        x = x + jax.nn.gelu(rms(x, b.mlp_norm.weight) @ b.mlp.fc.weight) @ b.mlp.proj.weight
    return rms(x, model.final_norm.weight) @ (model.embed.T if c.tie_embeddings else model.lm_head)


@pytest.mark.parametrize("switches", [{}, SHORTCUTS], ids=["default", "shortcuts"])
@pytest.mark.parametrize("path", ["forward", "cached"])
def test_the_blocks_equal_a_written_out_transformer_in_training_and_decoding(path, switches):
    # Training, prefill and decoding run the same Block: a bug in it (say, a residual dropped)
    # fails here through both paths, not only where a path was written out twice.
    model = GPT(tiny(mlp_activation="gelu", **switches), key=jr.key(0))
    leaves, treedef = jax.tree.flatten(model)  # every parameter off its init: gains leave 1
    model = jax.tree.unflatten(treedef, [a + 0.1 * jr.normal(jr.key(i), a.shape)
                                         for i, a in enumerate(leaves)])
    tokens = random_tokens(jr.key(2), (TINY.block_size,))
    if path == "forward":
        logits = forward(model, tokens)
    else:  # a prefill of half the tokens, then one token at a time
        step, half = eqx.filter_jit(extend), TINY.block_size // 2
        first, cache = step(model, tokens[:half], empty_cache(model.config))
        logits = [first]
        for token in tokens[half:]:
            out, cache = step(model, token[None], cache)
            logits.append(out)
        logits = jnp.concatenate(logits)
    np.testing.assert_allclose(logits, written_out(model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("switch", ["remat", "unroll_layers"])
def test_how_the_blocks_are_run_does_not_change_the_loss_or_gradients(switch):
    # remat recomputes each block in the backward; unroll_layers unrolls the layer scan
    tokens = random_tokens(jr.key(1), (2, TINY.block_size))
    targets = random_tokens(jr.key(2), (2, TINY.block_size))
    on = GPT(tiny(**{switch: True}), key=jr.key(0))
    off = GPT(tiny(**{switch: False}), key=jr.key(0))
    loss_a, grads_a = value_and_grad(on, tokens, targets)
    loss_b, grads_b = value_and_grad(off, tokens, targets)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_trace_size_does_not_grow_with_depth():
    # One compiled block whatever n_layer: the traced program has the same number of equations.
    def equation_count(n_layer):
        model = GPT(tiny(n_layer=n_layer), key=jr.key(0))
        tokens = jnp.zeros((TINY.block_size,), jnp.int32)
        return len(jax.make_jaxpr(lambda m, t: m(t))(model, tokens).eqns)

    assert equation_count(2) == equation_count(12)


def test_bf16_forward_is_close_to_float32():
    tokens = random_tokens(jr.key(1), (TINY.block_size,))
    f32 = GPT(tiny(compute_dtype="float32"), key=jr.key(0))
    bf16 = GPT(tiny(compute_dtype="bfloat16"), key=jr.key(0))  # the same float32 parameters
    exact, approx = forward(f32, tokens), forward(bf16, tokens)
    relative_error = float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))
    assert 0 < relative_error < 2e-2  # > 0: the bf16 path really ran in lower precision


def test_dropout_is_keyed_and_off_without_a_key():
    model = GPT(tiny(dropout=0.2), key=jr.key(0))
    tokens = random_tokens(jr.key(1), (TINY.block_size,))
    train_a = forward(model, tokens, key=jr.key(3))
    np.testing.assert_array_equal(forward(model, tokens), forward(model, tokens))
    np.testing.assert_array_equal(train_a, forward(model, tokens, key=jr.key(3)))
    assert not np.allclose(train_a, forward(model, tokens), atol=1e-3)
    assert not np.allclose(train_a, forward(model, tokens, key=jr.key(4)), atol=1e-3)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_zeroes_at_its_rate_and_keeps_the_expectation(rate):
    x = jnp.full((100_000,), 3.0, jnp.bfloat16)
    out = dropout(x, rate, jr.key(0))
    assert out.dtype == x.dtype
    kept = np.asarray(out != 0)
    assert abs(kept.mean() - (1 - rate)) < 0.01  # zeroes the fraction asked for
    np.testing.assert_allclose(np.asarray(out[kept], np.float32), 3.0 / (1 - rate), rtol=1e-2)
    assert abs(float(out.astype(jnp.float32).mean()) - 3.0) < 0.03  # E[out] = x: inverted dropout
    assert dropout(x, rate, None) is x  # inference: no key, no dropout


def test_gpt2_small_parameter_count_and_flops_match_closed_form():
    config = GPTConfig(vocab_size=50304)  # GPT-2 124M shapes, tied, QK-norm on
    V, d, L, T, hd = 50304, 768, 12, 1024, 64
    per_block = 12 * d * d + 2 * d + 2 * hd  # qkv, proj, fc, mlp proj; two norms; q/k norms
    non_embedding = L * per_block + d  # + final norm
    model = eqx.filter_eval_shape(GPT, config, key=jr.key(0))
    assert num_params(model) == V * d + non_embedding
    assert num_params(model, non_embedding=True) == non_embedding
    # PaLM's 6N + 12LdT with N the matrices a token is multiplied by (the norm gains are not)
    assert flops_per_token(config) == 6 * (L * 12 * d * d + V * d) + 12 * L * d * T


def test_flops_per_token_counts_the_matmuls_the_model_does(monkeypatch):
    import model as model_py

    config = GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=2, n_embd=32)
    before = flops_per_token(config)
    mlp = model_py.MLP.__call__
    # a researcher's edit: one more (d, d) matmul in every MLP
    monkeypatch.setattr(model_py.MLP, "__call__", lambda self, x: mlp(self, x) + x @ jnp.eye(32, dtype=x.dtype))
    flops_per_token.cache_clear()
    try:
        assert flops_per_token(config) == before + 3 * config.n_layer * 2 * 32 * 32  # fwd + bwd
    finally:
        flops_per_token.cache_clear()


def test_124m_forward_runs_on_cpu():
    config = GPTConfig(vocab_size=50304)
    # drawn in one optimised program from XLA's own random bits: eagerly, under the suite's
    # unoptimised compiles, threefry's 124M draws took 16 s of the test's 19
    key = jr.key(0, impl="unsafe_rbg")
    draw = jax.jit(lambda key: eqx.filter(GPT(config, key=key), eqx.is_array))
    params = draw.lower(key).compile({"xla_backend_optimization_level": 3})(key)
    model = eqx.combine(params, eqx.filter(eqx.filter_eval_shape(GPT, config, key=jr.key(0)),
                                           eqx.is_array, inverse=True))
    tokens = random_tokens(jr.key(1), (64,), config.vocab_size)
    logits = jax.jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (64, config.vocab_size)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_gradients_are_finite_and_nonzero_for_every_parameter():
    for config in (tiny(), tiny(tie_embeddings=False, dropout=0.1), tiny(**SHORTCUTS)):
        model = GPT(config, key=jr.key(0))
        tokens = random_tokens(jr.key(1), (4, TINY.block_size))
        targets = random_tokens(jr.key(2), (4, TINY.block_size))
        _, grads = value_and_grad(model, tokens, targets, key=jr.key(3))
        for path, g in jax.tree_util.tree_leaves_with_path(eqx.filter(grads, eqx.is_array)):
            name = jax.tree_util.keystr(path)
            assert bool(jnp.all(jnp.isfinite(g))), name
            assert float(jnp.abs(g).max()) > 0, name


def test_tiny_model_overfits_one_batch():
    model = GPT(tiny(compute_dtype="bfloat16"), key=jr.key(0))
    tokens = random_tokens(jr.key(1), (4, TINY.block_size))
    targets = random_tokens(jr.key(2), (4, TINY.block_size))
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, tokens, targets)
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(model, updates), opt_state, loss

    for _ in range(100):  # below 0.1 by step 50, 0.027 at 100 (2026-12-07)
        model, opt_state, loss = step(model, opt_state)
    assert float(loss) < 0.1


def skewed_tokens(key, shape, vocab):
    """Ids as frequent as in text: a few ids take most of the positions (Zipf-like)."""
    return jnp.minimum(jr.geometric(key, 0.3, shape) - 1, vocab - 1)


def test_embedding_gradient_equals_autodiff_scatter_add_and_repeats_bitwise():
    # float32 on CPU: the lookup's gradient (a scatter-add here) agrees with autodiff's to rounding.
    table = jr.normal(jr.key(0), (97, 16))
    tokens = skewed_tokens(jr.key(1), (4, 50), 97)
    assert int(jnp.bincount(tokens.reshape(-1)).max()) > 20  # the test has collisions
    cotangent = jr.normal(jr.key(2), (4, 50, 16))
    grad = jax.jit(jax.grad(lambda t: jnp.sum(embed(t, tokens) * cotangent)))
    plain = jax.grad(lambda t: jnp.sum(t[tokens] * cotangent))(table)
    ours = grad(table)
    np.testing.assert_allclose(ours, plain, atol=1e-5, rtol=1e-5)
    unseen = np.setdiff1d(np.arange(97), np.asarray(tokens))
    assert unseen.size and not np.any(np.asarray(ours)[unseen])  # exactly zero, no rounding
    np.testing.assert_array_equal(ours, grad(table))  # deterministic: same bits every time
    np.testing.assert_array_equal(embed(table, tokens), table[tokens])


@pytest.mark.parametrize("sum_rows", [sum_rows_by_id, scatter_rows_by_id])
def test_both_ways_of_summing_rows_by_id_agree_on_skewed_ids(sum_rows):
    # float32: the GPU's sorted running sum and the CPU's scatter-add agree to rounding, on ids as
    # skewed as text's; an id never seen gets exactly zero.
    tokens = skewed_tokens(jr.key(1), (4, 50), 97)
    rows = jr.normal(jr.key(2), (4, 50, 16))
    reference = np.zeros((97, 16), np.float64)
    np.add.at(reference, np.asarray(tokens).reshape(-1), np.asarray(rows, np.float64).reshape(-1, 16))
    summed = np.asarray(jax.jit(sum_rows, static_argnums=2)(tokens, rows, 97))
    np.testing.assert_allclose(summed, reference, atol=1e-5, rtol=1e-5)
    unseen = np.setdiff1d(np.arange(97), np.asarray(tokens))
    assert unseen.size and not np.any(summed[unseen])


@pytest.mark.parametrize("platform, present, absent", [("cpu", "scatter", "sort"),
                                                       ("cuda", "sort", "scatter")])
def test_the_lookup_gradient_is_a_scatter_add_on_cpu_and_a_sorted_sum_on_gpus(platform, present,
                                                                               absent):
    # GPUs keep the sort (no atomics: repeatable, fast on skewed ids); CPUs the quicker scatter-add.
    tokens = jnp.zeros((2, 8), jnp.int32)
    grad = jax.jit(jax.grad(lambda t: jnp.sum(embed(t, tokens))))
    hlo = grad.trace(jnp.ones((11, 4))).lower(lowering_platforms=(platform,)).as_text()
    assert f"stablehlo.{present}" in hlo and f"stablehlo.{absent}" not in hlo


def test_sum_rows_by_id_handles_ids_never_seen_and_one_id_everywhere():
    rows = jnp.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(sum_rows_by_id(jnp.array([2, 0, 2, 2, 0, 4]), rows, 5),
                                  [[2 + 8, 3 + 9], [0, 0], [0 + 4 + 6, 1 + 5 + 7], [0, 0], [10, 11]])
    np.testing.assert_array_equal(sum_rows_by_id(jnp.zeros(6, int), rows, 2),
                                  [[30, 36], [0, 0]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_cross_entropy_matches_optax(dtype):
    logits = (4 * jr.normal(jr.key(0), (3, 7, 50))).astype(dtype)
    targets = skewed_tokens(jr.key(1), (3, 7), 50)
    reference = lambda x: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        x.astype(jnp.float32), targets).mean()
    ours = lambda x: cross_entropy(x, targets).mean()  # noqa: E731
    assert ours(logits).dtype == jnp.float32  # float32 loss whatever the logits' dtype
    # Both read the same logits in float32: equal to float32 rounding.
    np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
    grad, expected = jax.grad(ours)(logits), jax.grad(reference)(logits)
    assert grad.dtype == logits.dtype  # the gradient leaves in the logits' dtype
    # bf16 keeps 8 mantissa bits: the gradient differs by its rounding, ~0.4% of its size.
    tolerance = 1e-7 if dtype == "float32" else 4e-3 * float(jnp.abs(expected).max())
    np.testing.assert_allclose(grad.astype(jnp.float32), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropies_of_several_targets_match_optax_target_by_target(dtype):
    # One softmax scores three targets a position (multi-token prediction): each loss is optax's,
    # and the gradient of their weighted sum the weighted sum of optax's gradients.
    logits = (4 * jr.normal(jr.key(0), (3, 7, 50))).astype(dtype)
    targets = skewed_tokens(jr.key(1), (3, 7, 3), 50)
    weights = jnp.array([1.0, 0.5, 0.25])
    reference = lambda x: jnp.stack([optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        x.astype(jnp.float32), targets[..., i]) for i in range(3)], axis=-1)
    ours = lambda x: cross_entropies(x, targets)  # noqa: E731
    np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(ours(x) * weights))(logits)
    expected = jax.grad(lambda x: jnp.sum(reference(x) * weights))(logits)
    assert grad.dtype == logits.dtype
    # bf16: both gradients leave rounded to 8 mantissa bits, so up to one ulp apart (2**-7 at the
    # largest's binade)
    largest = float(jnp.abs(expected.astype(jnp.float32)).max())
    tolerance = 1e-6 if dtype == "float32" else 2**-7 * 2 ** math.floor(math.log2(largest)) * 1.01
    np.testing.assert_allclose(grad.astype(jnp.float32), expected.astype(jnp.float32),
                               atol=tolerance, rtol=0)


def test_multi_token_loss_scores_the_targets_ahead_from_the_same_logits():
    model = GPT(TINY, key=jr.key(0))
    tokens = random_tokens(jr.key(1), (2, 9))
    targets = random_tokens(jr.key(2), (2, 9)).at[0, 4].set(-1)  # a target no loss counts
    weights = jnp.array([0.5, 0.25])
    objective, next_token = eqx.filter_jit(multi_token_loss)(model, tokens, targets, weights)
    # By hand: position t scores targets t, t+1 and t+2 (weights 1, 0.5, 0.25) where the window
    # has them and they count, over the number of counted next-token targets.
    log_probs = np.stack([np.asarray(jax.nn.log_softmax(forward(model, row))) for row in tokens])
    total = 0.0
    for b, t in np.ndindex(targets.shape):
        for i, weight in enumerate([1.0, 0.5, 0.25]):
            if t + i < targets.shape[1] and targets[b, t + i] >= 0:
                total -= weight * log_probs[b, t, targets[b, t + i]]
    num_counted = int(jnp.sum(targets >= 0))
    np.testing.assert_allclose(objective, total / num_counted, rtol=1e-5)
    np.testing.assert_allclose(next_token, value_and_grad(model, tokens, targets)[0], rtol=1e-6)
    # With no weight ahead it is training's next-token loss, gradient and all.
    zero = jnp.zeros(2)
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: multi_token_loss(m, tokens, targets, zero)[0]))(model)
    expected = value_and_grad(model, tokens, targets)[1]
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_attention_dropout_changes_the_forward_only_when_a_key_is_given():
    tokens = random_tokens(jr.key(1), (TINY.block_size,))
    dropped = GPT(tiny(attn_dropout=0.5), key=jr.key(0))
    plain = GPT(tiny(), key=jr.key(0))  # the same parameters
    # Inference (no key) takes the fused attention path: the same function as without dropout.
    np.testing.assert_allclose(forward(dropped, tokens), forward(plain, tokens), atol=1e-6)
    # Training (a key, residual dropout 0): only attn_dropout can change the output.
    np.testing.assert_allclose(forward(plain, tokens, key=jr.key(3)), forward(plain, tokens),
                               atol=1e-6)
    train_a = forward(dropped, tokens, key=jr.key(3))
    assert not np.allclose(train_a, forward(dropped, tokens), atol=1e-3)
    np.testing.assert_array_equal(train_a, forward(dropped, tokens, key=jr.key(3)))
    assert not np.allclose(train_a, forward(dropped, tokens, key=jr.key(4)), atol=1e-3)


def test_explicit_attention_at_rate_zero_equals_the_fused_path():
    from model import causal_mask, explicit_attention

    q, k, v = (jr.normal(jr.key(i), (9, 2, 8)) for i in range(3))
    written_out = explicit_attention(q, k, v, causal_mask(jnp.arange(9), jnp.arange(9)), 0.0, jr.key(5))
    fused = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    np.testing.assert_allclose(written_out, fused, atol=1e-5)


BAD_CONFIGS = [dict(n_embd=65), dict(attention="flash"), dict(compute_dtype="fp8"),
               dict(dropout=1.0), dict(attn_dropout=-0.1), dict(position_embedding="alibi"),
               dict(norm="batch"), dict(norm_eps=0.0), dict(n_layer=0),
               dict(bigram_embed=True, vocab_size=50304)]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=lambda bad: next(iter(bad)))
def test_bad_config_is_refused_in_one_line_naming_the_field(bad):
    with pytest.raises(ValueError, match=f"^{next(iter(bad))}=") as refused:
        tiny(**bad)
    assert "\n" not in str(refused.value)


def test_the_shortcuts_add_scalars_and_lookups_not_matmuls():
    """num_params leaves the new lookup tables out of the non-embedding count; flops_per_token
    finds no new matmul."""
    L, V, d = SHORTCUTS["n_layer"], TINY.vocab_size, TINY.n_embd
    plain = GPT(tiny(n_layer=L, tie_embeddings=False), key=jr.key(0))
    shortcuts = GPT(tiny(**SHORTCUTS), key=jr.key(0))
    scalars = 2 * L  # the value mix
    tables = (V + 1) * V * d + (L + 1) // 2 * V * d  # bigram pairs, value tables
    assert num_params(shortcuts, non_embedding=True) == num_params(plain, non_embedding=True) + scalars
    assert num_params(shortcuts) == num_params(plain) + scalars + tables
    assert flops_per_token(shortcuts.config) == flops_per_token(plain.config)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_shortcuts_new_arrays_get_their_optimizer_labels(optimizer):
    """Scalars take AdamW without decay, lookup tables and the head AdamW with it, as the
    embedding does; only the blocks' matrices take Muon."""
    from config import TrainConfig
    from optim import optimizer_labels

    params = eqx.filter(GPT(tiny(**SHORTCUTS), key=jr.key(0)), eqx.is_array)
    labels = optimizer_labels(TrainConfig(model=tiny(**SHORTCUTS), optimizer=optimizer))(params)
    by_path = {jax.tree_util.keystr(p): label for p, label in jax.tree_util.tree_leaves_with_path(labels)}
    for path in (".blocks.attn.value_lambdas",):
        assert by_path[path] == "no_decay", path
    for path in (".bigram_embed", ".value_embeds", ".lm_head", ".embed"):
        assert by_path[path] == "decay", path
    matrices = {p for p in by_path if p.startswith(".blocks") and p.endswith(".weight")
                and "norm" not in p}
    assert {p for p, label in by_path.items() if label == "muon"} == \
        (matrices if optimizer == "muon" else set())


@pytest.mark.slow
def test_a_run_with_the_shortcuts_resumes_bit_for_bit_and_cannot_drop_one(tmp_path, shakespeare_input):
    """Their arrays and their optimizer state come back from a checkpoint; a resume that turns
    a shortcut off would be another model, and is refused naming it."""
    import subprocess
    import sys

    import cli
    import train
    from config import TrainConfig

    repo = Path(__file__).resolve().parents[1]
    data_dir = tmp_path / "data"
    subprocess.run([sys.executable, "prepare_shakespeare.py", "--input", str(shakespeare_input),
                    "--out_dir", str(data_dir)], cwd=repo, check=True, capture_output=True)
    overrides = [f"--data_dir={data_dir}", "--model.n_embd=32", "--model.n_head=2",
                 "--model.block_size=16", "--batch_size=4", "--eval_iters=1", "--log_interval=1",
                 "--warmup_steps=2", "--max_steps=6", "--lr_decay_steps=6", "--eval_interval=3",
                 *(f"--model.{name}={value}" for name, value in SHORTCUTS.items())]
    config = cli.apply_overrides(cli.load_config("shakespeare_char_cpu", TrainConfig), overrides)
    straight = train.train(config, tmp_path / "straight")
    train.train(dataclasses.replace(config, max_steps=3), tmp_path / "resumed")
    resumed = train.train(config, tmp_path / "resumed")
    assert "resuming at step 3" in (tmp_path / "resumed" / "log.txt").read_text()
    arrays = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_array))  # noqa: E731
    assert resumed.bigram_embed is not None and len(arrays(resumed)) == len(arrays(straight))
    for a, b in zip(arrays(straight), arrays(resumed)):
        np.testing.assert_array_equal(a, b)
    without = dataclasses.replace(config, model=dataclasses.replace(config.model, value_embeds=False))
    with pytest.raises(cli.UserError, match=r"model\.value_embeds"):
        train.train(without, tmp_path / "resumed")
