"""Sampling: the KV cache equals the full forward; filters, determinism; sample.py end to end."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import checkpoints
import evaluation
import model as model_py
from decode import generate, sample_token, top_k_filter, top_p_filter
from model import GPT, GPT2_ARCHITECTURE, GPTConfig, empty_cache, extend, loss_fn, with_config
from sample import SEPARATOR, generate_samples, sample_keys

REPO = Path(__file__).resolve().parents[1]
# float32 compute: the cached and the full forward then agree to rounding.
TINY = GPTConfig(
    block_size=32, vocab_size=65, n_layer=2, n_head=4, n_embd=64, compute_dtype="float32"
)

# Every architecture switch, one line each: the cached decoding must equal the forward under
# each. A new switch is a new line here.
ARCHITECTURES = [
    dict(),  # the default: RoPE, RMSNorm, no biases, QK-norm, tied head
    dict(position_embedding="learned"),
    dict(norm="layer"),
    dict(bias=True),
    dict(qk_norm=False),
    dict(tie_embeddings=False),
    dict(mlp_activation="relu2"),
    dict(value_embeds=True, n_layer=3),  # blocks 0 and 2 share a table, block 1 has its own
    dict(bigram_embed=True),
    GPT2_ARCHITECTURE,  # all of GPT-2's settings at once
]
# The speedrun's shortcuts all at once: decoding past block_size must still equal the forward.
SHORTCUTS = dict(value_embeds=True, bigram_embed=True, tie_embeddings=False)
# Each way the forward computes attention: jax's XLA call, the explicit written-out one (the
# CPU default), and that one as training with attn_dropout takes it (forced below with its
# dropout off, so it must agree exactly).
ATTENTION_PATHS = ["xla", "explicit", "dropout_path"]

forward = eqx.filter_jit(lambda model, tokens, key=None: model(tokens, key=key))
extend_jit = eqx.filter_jit(extend)
generate_jit = eqx.filter_jit(generate)


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT(TINY, key=jr.key(0))


@pytest.fixture(scope="module")
def small_block_model() -> GPT:
    # Weights x4: peakier logits, so even greedy decoding of a random model does not just repeat
    # one token (copies of one token hide decoding bugs: attention cannot count them).
    model = GPT(dataclasses.replace(TINY, block_size=16), key=jr.key(1))
    return jax.tree.map(lambda a: 4 * a, model)


@pytest.fixture(scope="module")
def small_block_shortcuts() -> GPT:
    """As small_block_model, with every shortcut on and moved off its init (the zero head and
    the zero bigram table would otherwise hide them)."""
    model = GPT(dataclasses.replace(TINY, block_size=16, n_layer=3, **SHORTCUTS), key=jr.key(1))
    return jax.tree.map(lambda a: 4 * a, perturbed(model, jr.key(2)))


def perturbed(model: GPT, key) -> GPT:
    """Every parameter moved off its init: norm gains leave 1 and biases leave 0, so a cached path
    that forgets one of them cannot agree by chance."""
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(key, len(leaves))
    leaves = [a + 0.05 * jr.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


def forward_by(path: str, model: GPT, tokens, monkeypatch):
    """The full forward's logits through one attention path."""
    if path != "dropout_path":
        return forward(with_config(model, dataclasses.replace(model.config, attention=path)), tokens)
    # attn_dropout > 0 with a key takes the written-out path whatever the implementation; its
    # rate is set to 0 here, and residual dropout is 0, so the key changes nothing else.
    calls = []
    written_out = model_py.explicit_attention

    def without_dropout(q, k, v, mask, rate, key):
        calls.append(rate)
        return written_out(q, k, v, mask, 0.0, key)

    monkeypatch.setattr(model_py, "explicit_attention", without_dropout)
    config = dataclasses.replace(model.config, attn_dropout=0.5, attention="xla")
    logits = eqx.filter_jit(lambda m, t, k: m(t, key=k))(with_config(model, config), tokens, jr.key(9))
    assert calls, "the written-out attention path was not taken"
    return logits


@pytest.mark.parametrize("path", ATTENTION_PATHS)
@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda changes: ",".join(
    f"{k}={v}" for k, v in changes.items()) or "default")
def test_cached_decoding_equals_full_forward_at_every_position(architecture, path, monkeypatch):
    config = dataclasses.replace(TINY, attention="xla", **architecture)
    model = perturbed(GPT(config, key=jr.key(0)), jr.key(1))
    tokens = jr.randint(jr.key(2), (config.block_size,), 0, config.vocab_size)
    expected = forward_by(path, model, tokens, monkeypatch)
    # A prefill, then as many tokens again after it: one compiled shape serves both (single-token
    # decoding against the forward: test_generation_past_block_size_sees_exactly_the_cached_tokens)
    half = config.block_size // 2
    first, cache = extend_jit(model, tokens[:half], empty_cache(config))
    second, cache = extend_jit(model, tokens[half:], cache)
    assert int(cache.length) == config.block_size
    np.testing.assert_allclose(np.concatenate([first, second]), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda changes: ",".join(
    f"{k}={v}" for k, v in changes.items()) or "default")
def test_evaluation_scores_the_model_that_training_trains(architecture):
    """eval.py and HellaSwag score through the forward that training's loss runs: on one batch
    (some targets ignored) the loss they sum is training's loss."""
    config = dataclasses.replace(TINY, **architecture)
    model = perturbed(GPT(config, key=jr.key(0)), jr.key(1))
    tokens = jr.randint(jr.key(3), (4, config.block_size + 1), 0, config.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].at[0, :5].set(-1)
    training = eqx.filter_jit(loss_fn)(model, inputs, targets)
    sums, counts = evaluation.row_losses(model, inputs, targets, None)
    np.testing.assert_allclose(float(sums.sum() / counts.sum()), float(training), rtol=1e-6)


@pytest.mark.parametrize("prompt_len, model_name", [  # 20 > block_size: the prompt is cut
    (3, "small_block_model"), (20, "small_block_model"), (20, "small_block_shortcuts")])
def test_generation_past_block_size_sees_exactly_the_cached_tokens(request, prompt_len, model_name):
    """2.5 x block_size sampled tokens: every step's logits are those of a fresh forward over the
    tokens the cache holds (re-prefilled from the last block_size//2 when it fills up): with the
    bigram embedding, the first token of a rebuilt cache has no token before it, as in a forward."""
    model = request.getfixturevalue(model_name)
    block = model.config.block_size
    new = 5 * block // 2
    prompt = jr.randint(jr.key(3), (prompt_len,), 0, TINY.vocab_size)
    tokens, logits = generate_jit(model, prompt, jr.key(0), new, temperature=1.0,
                                  return_logits=True)
    assert tokens.shape == (new,) and logits.shape == (new, TINY.vocab_size)

    window, rebuilds = [int(t) for t in prompt[-block:]], 0  # the spec, in plain Python
    for i in range(new):
        padded = jnp.zeros(block, jnp.int32).at[: len(window)].set(jnp.asarray(window))
        expected = forward(model, padded)[len(window) - 1]  # causal: the padding is not seen
        # float32, the cache's sums in another order than the forward's: logits up to ~20 (the
        # weights x4) agree to 3e-4 (seen: at most 1.6e-4); a decoding bug moves them by ~1
        np.testing.assert_allclose(logits[i], expected, atol=3e-4, rtol=0, err_msg=f"step {i}")
        if len(window) == block:
            window, rebuilds = window[len(window) - block // 2 + 1 :], rebuilds + 1
        window.append(int(tokens[i]))
    assert rebuilds >= 2 and len(set(np.asarray(tokens).tolist())) > 10


def test_greedy_is_reproducible_and_top_k_1_is_greedy(small_block_model):
    prompt, keys = jnp.asarray([1, 2, 3]), sample_keys(0, 2)
    greedy = generate_samples(small_block_model, prompt, keys, 40, 0.0, 0, 1.0, None)
    again = generate_samples(small_block_model, prompt, sample_keys(5, 2), 40, 0.0, 0, 1.0, None)
    top1 = generate_samples(small_block_model, prompt, keys, 40, 0.8, 1, 1.0, None)
    assert len(set(np.asarray(greedy[0]).tolist())) > 5
    np.testing.assert_array_equal(greedy, again)
    np.testing.assert_array_equal(greedy[0], greedy[1])
    np.testing.assert_array_equal(top1, greedy)


def test_same_seed_same_samples_different_seed_different_samples(small_block_model):
    prompt = jnp.asarray([7])

    def run(seed):  # vocab_limit=40, as for a padded vocab_size (GPT-2's 50257 -> 50304)
        keys = sample_keys(seed, 3)
        return generate_samples(small_block_model, prompt, keys, 40, 1.0, 0, 0.95, 40)

    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(row) for row in np.asarray(a).tolist()}) == 3  # each sample its own key
    assert int(jnp.maximum(a.max(), c.max())) < 40  # no id past vocab_limit comes out
    # the vmapped samples are the unbatched generate, key by key; sample i whatever num_samples
    key = sample_keys(0, 1)[0]
    one = generate_jit(small_block_model, prompt, key, 40, temperature=1.0, top_p=0.95,
                       vocab_limit=40)
    np.testing.assert_array_equal(one, a[0])


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    probs = jnp.asarray([0.10, 0.50, 0.15, 0.25])  # by likelihood: 1, 3, 2, 0
    logits = jnp.log(probs)
    for p, kept in [(1e-6, {1}), (0.3, {1}), (0.6, {1, 3}), (0.8, {1, 3, 2}), (0.95, {0, 1, 2, 3}),
                    (1.0, {0, 1, 2, 3})]:
        out = top_p_filter(logits, p)
        assert set(np.flatnonzero(np.isfinite(out)).tolist()) == kept, p
        idx = sorted(kept)
        np.testing.assert_array_equal(np.asarray(out)[idx], np.asarray(logits)[idx])  # unchanged


def test_top_k_filter():
    logits = jnp.log(jnp.asarray([0.10, 0.50, 0.15, 0.25]))
    assert set(np.flatnonzero(np.isfinite(top_k_filter(logits, 2))).tolist()) == {1, 3}
    np.testing.assert_array_equal(top_k_filter(logits, 0), logits)


def test_sampling_follows_the_filtered_distribution():
    logits = jnp.log(jnp.asarray([0.10, 0.50, 0.15, 0.25]))
    keys = jr.split(jr.key(0), 4000)
    draw = jax.jit(jax.vmap(lambda k, t, p: sample_token(logits, k, t, 0, p), (0, None, None)),
                   static_argnums=(1, 2))
    freq = np.bincount(draw(keys, 1.0, 1.0), minlength=4) / len(keys)
    np.testing.assert_allclose(freq, [0.10, 0.50, 0.15, 0.25], atol=0.03)
    nucleus = np.bincount(draw(keys, 1.0, 0.6), minlength=4) / len(keys)  # only 1 and 3 left
    np.testing.assert_allclose(nucleus, [0, 0.5 / 0.75, 0, 0.25 / 0.75], atol=0.03)
    assert set(np.asarray(draw(keys[:50], 0.0, 1.0)).tolist()) == {1}  # temperature 0: argmax


def test_temperature_divides_the_logits():
    logits = jnp.log(jnp.asarray([0.10, 0.50, 0.15, 0.25]))
    keys = jr.split(jr.key(1), 4000)
    draw = jax.jit(jax.vmap(lambda k, t: sample_token(logits, k, t, 0, 1.0), (0, None)),
                   static_argnums=1)
    for temperature in (0.5, 2.0):  # sharper, flatter: softmax(logits / T)
        freq = np.bincount(draw(keys, temperature), minlength=4) / len(keys)
        np.testing.assert_allclose(freq, jax.nn.softmax(logits / temperature), atol=0.03)
    assert set(np.asarray(draw(keys[:200], 1e-3)).tolist()) == {1}  # T -> 0: the argmax
    flat = np.bincount(draw(keys, 1e3), minlength=4) / len(keys)  # T large: near uniform
    np.testing.assert_allclose(flat, 0.25, atol=0.03)


def test_with_config_changes_the_static_config_and_keeps_the_arrays(model):
    bf16 = with_config(model, dataclasses.replace(TINY, compute_dtype="bfloat16"))
    assert bf16.config.compute_dtype == "bfloat16"
    assert bf16.blocks.attn.config.compute_dtype == "bfloat16"  # the nested copies too
    assert all(a is b for a, b in zip(jax.tree.leaves(bf16), jax.tree.leaves(model)))
    logits = forward(bf16, jnp.arange(8))
    np.testing.assert_allclose(logits, forward(model, jnp.arange(8)), atol=0.05)
    with pytest.raises(ValueError):
        with_config(model, dataclasses.replace(TINY, n_embd=32))


# ---------------------------------------------------------------------------------------------
# bench.py --decode: the KV cache against the naive loop


def test_the_decode_benchmarks_naive_loop_samples_what_the_cache_samples(small_block_model):
    import bench

    prompt = jnp.asarray([3, 1, 4], jnp.int32)  # 3 + 12 tokens: within the block, no rebuild
    naive_jit = eqx.filter_jit(bench.naive_generate)
    for temperature in (0.0, 1.0):  # the same step keys: the same draws from the same logits
        naive = naive_jit(small_block_model, prompt, jr.key(5), 12, temperature=temperature)
        cached = generate_jit(small_block_model, prompt, jr.key(5), 12, temperature=temperature)
        np.testing.assert_array_equal(naive, cached)


def test_bench_decode_reports_cached_and_naive_tokens_per_s(capsys):
    import bench

    bench.main(["--config=shakespeare_char_cpu", "--decode", "--max_new_tokens=8", "--num_samples=2",
                "--model.n_layer=2", "--model.n_embd=64", "--model.vocab_size=65"])
    out = capsys.readouterr().out
    assert "2 x 8 new tokens" in out and "compute float32" in out, out
    measured = re.search(r"cached ([\d,.]+) tokens/s \| naive ([\d,.]+) tokens/s \| "
                         r"cached / naive ([\d.]+)x", out)
    assert measured, out
    cached, naive, ratio = (float(x.replace(",", "")) for x in measured.groups())
    assert ratio == pytest.approx(cached / naive, abs=0.06)


# ---------------------------------------------------------------------------------------------
# sample.py end to end, on a run trained for a few steps


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shakespeare_input) -> Path:
    root = tmp_path_factory.mktemp("sample_run")
    commands = [
        ["prepare_shakespeare.py", "--input", str(shakespeare_input),
         "--out_dir", str(root / "data")],
        ["launch.py", "--config=shakespeare_char_cpu", f"--data_dir={root / 'data'}",
         f"--rundir={root / 'run'}", "--max_steps=20", "--warmup_steps=5", "--eval_interval=10",
         "--eval_iters=2",
         "--log_interval=10", "--model.n_layer=2", "--model.n_embd=64"],
        # Ten more steps at a learning rate that wrecks the model: the latest checkpoint (30) is
        # then not the best one, so choosing between them is observable.
        ["launch.py", f"--rundir={root / 'run'}", "--max_steps=30", "--learning_rate=1.0",
         "--min_lr=1.0"],
    ]
    for command in commands:
        done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    return root / "run"


def run_sample(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_sample_prints_num_samples_texts(trained_run):
    # 100 new tokens > block_size 64: the cache is rebuilt on the way
    assert json.loads((trained_run / "config.json").read_text())["config"]["model"]["block_size"] == 64
    done = run_sample(f"--rundir={trained_run}", "--start=ROMEO:", "--num_samples=2",
                      "--max_new_tokens=100", "--seed=3")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.count(SEPARATOR + "\n") == 2
    samples = done.stdout.split(SEPARATOR + "\n")[:2]
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 100 + 1 for s in samples)


@pytest.mark.slow
def test_prompt_from_file_and_checkpoint_by_step(trained_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("KING:\n")
    done = run_sample(f"--rundir={trained_run}", f"--start=FILE:{prompt}", "--checkpoint=10",
                      "--num_samples=1", "--max_new_tokens=20", "--temperature=0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("KING:\n") and done.stdout.count(SEPARATOR + "\n") == 1


@pytest.mark.slow
def test_best_checkpoint_is_the_default_and_named(trained_run):
    manager = checkpoints.checkpoint_manager(trained_run)
    best = min(manager.all_steps(), key=lambda s: manager.metrics(s)["val_loss"])
    assert best != max(manager.all_steps())  # the run has a best that is not the latest
    done = run_sample(f"--rundir={trained_run}", "--num_samples=1", "--max_new_tokens=10",
                      "--dtype=bfloat16")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(SEPARATOR + "\n") == 1
    assert f"checkpoint at step {best})" in done.stderr  # says which one it loaded
    done = run_sample(f"--rundir={trained_run}", "--checkpoint=latest", "--num_samples=1",
                      "--max_new_tokens=10")
    assert f"checkpoint at step {max(manager.all_steps())})" in done.stderr


@pytest.mark.slow
def test_prompt_outside_the_vocabulary_is_a_one_line_error(trained_run):
    done = run_sample(f"--rundir={trained_run}", "--start=café")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "'é'" in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_run_samples_without_its_data_and_a_missing_data_dir_is_a_clear_error(trained_run,
                                                                                 tmp_path):
    # a copy of the run whose data directory has gone: config.json says what the ids mean
    shutil.copytree(trained_run, tmp_path / "run")
    config = json.loads((trained_run / "config.json").read_text())
    config["config"]["data_dir"] = str(tmp_path / "gone")
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    done = run_sample(f"--rundir={tmp_path / 'run'}", "--num_samples=1", "--max_new_tokens=5")
    assert done.returncode == 0 and SEPARATOR in done.stdout, done.stderr
    # a run from before config.json recorded its tokenizer: the data directory is needed
    config["data"] = {key: value for key, value in config["data"].items()
                      if key not in ("tokenizer", "chars", "vocab_size")}
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    done = run_sample(f"--rundir={tmp_path / 'run'}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "gone does not exist" in lines[0] and "data directory" in lines[0]


SAMPLER = {"seed": 0, "step": 0}  # a batch sampler's state, as a checkpoint saves it


def test_auto_checkpoint_is_the_best_when_one_has_a_val_loss(tmp_path):
    params = {"w": jnp.ones(3)}
    manager = checkpoints.checkpoint_manager(tmp_path, keep_last=5)
    checkpoints.save_checkpoint(manager, 1, params, params, SAMPLER, [0, 0])  # no val loss: latest
    manager.wait_until_finished()
    assert checkpoints.choose_step(tmp_path, "auto") == 1
    for step, val_loss in [(2, 3.0), (3, 1.0), (4, 2.0)]:
        checkpoints.save_checkpoint(manager, step, params, params, SAMPLER, [0, 0], val_loss)
    manager.wait_until_finished()
    assert checkpoints.choose_step(tmp_path, "auto") == 3
    assert checkpoints.choose_step(tmp_path, "latest") == 4
