"""float16 compute with dynamic loss scaling (optim.dynamic_loss_scale, train.py's step and loop),
and compute_dtype="auto" (model.pick_compute_dtype), on tiny in-process runs of Tiny Shakespeare.

XLA:CPU computes float16 arrays as float16 between its fusions: a gradient below float16's
smallest subnormal (6e-8) is flushed to zero there as on a GPU.
"""

import ast
import dataclasses
import json
from types import SimpleNamespace

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import data
import eval as eval_py
import bench
import launch
import optim
import sample
import sharding
import train
from cli import UserError
from config import TrainConfig
from conftest import fake_devices
from model import GPT, GPTConfig, pick_compute_dtype
from test_bad_input import one_line_error
from test_train import REPO, params_of, run, scalars, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shakespeare_input) -> str:
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    run([REPO / "prepare_shakespeare.py", "--input", shakespeare_input, "--out_dir", out],
        check=True)
    return str(out)


def in_dtype(config: TrainConfig, dtype: str, **changes) -> TrainConfig:
    model = dataclasses.replace(config.model, compute_dtype=dtype)
    return dataclasses.replace(config, model=model, **changes)


def step_metrics(config: TrainConfig, data_dir: str) -> list[dict]:
    """Each step's metrics of config.max_steps train steps on the run's first batches (no loop,
    no checkpoints: the step alone)."""
    params, opt_state, step = train.new_state_and_step(config, sharding.make_mesh(config))
    meta = data.load_meta(data_dir)
    batches = data.BatchSampler(data.open_split(data_dir, "train", meta), config.model.block_size,
                                config.batch_size, config.grad_accum, config.seed)
    rows = []
    for i in range(config.max_steps):
        params, opt_state, metrics = step(params, opt_state, *batches.batch(i), np.int32(i),
                                          np.zeros(2, np.uint32))
        rows.append(metrics)
    return jax.device_get(rows)


# ---------------------------------------------------------------------------------------------
# What the scaling is for


# GPT-2's step has 12,288 tokens and a vocabulary of 50,304: each logit's gradient, p/tokens, is
# ~1e-9, below float16's smallest subnormal. The tiny model's loss times 1e-4 puts its gradients
# there too; AdamW is blind to the factor (its update divides it out), so float32 trains as before.
SMALL = 1e-4


def test_loss_scaling_lets_float16_follow_float32_where_unscaled_float16_does_not(data_dir,
                                                                                 monkeypatch):
    loss_fn = train.loss_fn
    monkeypatch.setattr(train, "loss_fn", lambda *args, **kw: SMALL * loss_fn(*args, **kw))
    config = tiny_config(data_dir, optimizer="adamw", max_steps=50)
    runs = {"float32": in_dtype(config, "float32"),
            "float16, scaled": in_dtype(config, "float16"),  # from 2**16, the default
            # a scale of 1 that never grows in 50 steps: float16 without loss scaling
            "float16, unscaled": in_dtype(config, "float16", loss_scale_init=1.0)}
    metrics = {name: step_metrics(run_config, data_dir) for name, run_config in runs.items()}
    # the step unscales what it hands the optimizer: float16's first gradient is float32's, to
    # float16's precision (AdamW alone would not tell: it divides any factor out)
    first = {name: float(rows[0]["grad_norm"]) for name, rows in metrics.items()}
    np.testing.assert_allclose(first["float16, scaled"], first["float32"], rtol=0.01,
                               err_msg=f"first grad norms: {first}")
    assert {float(m["loss_scale"]) for m in metrics["float16, unscaled"]} == {1.0}
    assert not any(m["skipped"] for m in metrics["float16, unscaled"])
    # the loss at the end, the mean of the last 10 steps, in the loss's own units
    final = {name: np.mean([float(m["loss"]) for m in rows[-10:]]) / SMALL
             for name, rows in metrics.items()}
    shown = ", ".join(f"{name} {loss:.4f}" for name, loss in final.items())
    # float16's 11-bit mantissa: the scaled run stays within 0.05 of float32's (measured: 2e-5)
    assert abs(final["float16, scaled"] - final["float32"]) < 0.05, shown
    # the unscaled run's gradients flush to zero: it learns far less (measured: 0.59 higher at
    # step 50, 1.07 at step 100)
    assert final["float16, unscaled"] - final["float32"] > 0.3, shown
    assert final["float32"] < float(metrics["float32"][0]["loss"]) / SMALL - 1, shown  # it learns


# ---------------------------------------------------------------------------------------------
# Skip, halve, grow


def float16_optimizer(**changes):
    config = TrainConfig(model=GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2,
                                         n_embd=32, compute_dtype="float16"),
                         warmup_steps=0, max_steps=100, **changes)
    params = eqx.filter(GPT(config.model, key=jr.key(0)), eqx.is_array)
    return optim.make_optimizer(config), params


def same_arrays(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_step_that_overflows_is_skipped_and_halves_the_scale_growth_doubles_it():
    optimizer, params = float16_optimizer(loss_scale_init=2.0**10, loss_scale_growth_interval=3)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    finite = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    overflowed = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.inf), finite)

    seen = []  # (scale, finite steps in a row, steps skipped) after each step
    for grads in (finite, finite, finite, finite, overflowed, finite):
        before = state
        updates, state = update(grads, state, params)
        seen.append((float(state.scale), int(state.good_steps),
                     int(state.guarded.total_notfinite)))
        if grads is overflowed:  # nothing moves: the weights, the moments, the step count
            assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
            assert same_arrays(state.guarded.inner_state, before.guarded.inner_state)
            assert not state.guarded.last_finite
        else:
            assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))
    assert seen == [(2.0**10, 1, 0), (2.0**10, 2, 0), (2.0**11, 0, 0),  # the 3rd doubles it
                    (2.0**11, 1, 0), (2.0**10, 0, 1),  # an overflow halves it, and starts over
                    (2.0**10, 1, 1)]


def test_the_train_step_skips_an_overflowing_step_and_leaves_the_weights_as_they_were(data_dir):
    # 2**100 times the loss: the backward pass overflows float16, and the step must not apply
    config = in_dtype(tiny_config(data_dir), "float16", loss_scale_init=2.0**100)
    params, opt_state, step = train.new_state_and_step(config, sharding.make_mesh(config))
    # copies: the step donates its inputs' buffers
    params_before, inner_before = jax.tree.map(np.array, (params, opt_state.guarded.inner_state))
    tokens = np.random.default_rng(0).integers(0, 65, (1, 8, 33), dtype=np.int32)
    params, opt_state, metrics = step(params, opt_state, tokens[..., :-1], tokens[..., 1:],
                                      np.int32(5), np.zeros(2, np.uint32))
    assert bool(metrics["skipped"]) and int(metrics["skipped_steps"]) == 1
    assert float(metrics["loss_scale"]) == 2.0**99
    assert np.isfinite(float(metrics["loss"]))  # the forward was fine, the backward overflowed
    assert same_arrays(params, params_before)
    assert same_arrays(opt_state.guarded.inner_state, inner_before)


def test_float16_that_overflows_at_every_step_stops_with_one_line(data_dir, tmp_path, monkeypatch):
    # A loss of 1e30: float16's backward overflows at any scale; from 2**16 the 17th halving
    # takes the scale below 1
    loss_fn = train.loss_fn
    monkeypatch.setattr(train, "loss_fn", lambda *args, **kw: 1e30 * loss_fn(*args, **kw))
    config = in_dtype(tiny_config(data_dir, max_steps=40, log_interval=5, eval_interval=40),
                      "float16")
    with pytest.raises(UserError) as error:
        train.train(config, tmp_path / "run")
    message = str(error.value)
    assert "\n" not in message
    for words in ("float16 overflowed at every step up to step 17", "fell to 0.5",
                  "17 skipped steps", "no checkpoint was written",
                  "--model.compute_dtype=bfloat16", "lower --learning_rate"):
        assert words in message, message


# ---------------------------------------------------------------------------------------------
# The loop: its log line, TensorBoard, and a resume


def test_a_resume_continues_the_scale_bitwise_and_the_log_shows_it(data_dir, tmp_path):
    # From 2**20, doubled after 3 finite steps in a row, the tiny model overflows now and then: at
    # the checkpoint of step 4 the scale, its count of finite steps and the skips have all moved
    # (on a CPU: 2 skips, scale 2**18, 1 finite step; then a growth at step 6, a skip at 7)
    config = in_dtype(tiny_config(data_dir, max_steps=8, lr_decay_steps=8, eval_interval=4,
                                  log_interval=2), "float16", loss_scale_init=2.0**20,
                      loss_scale_growth_interval=3)
    straight = train.train(config, tmp_path / "straight")
    train.train(dataclasses.replace(config, max_steps=4), tmp_path / "resumed")
    resumed = train.train(config, tmp_path / "resumed")
    for a, b in zip(params_of(straight), params_of(resumed)):
        np.testing.assert_array_equal(a, b)

    logged = scalars(tmp_path / "straight")
    again = scalars(tmp_path / "resumed")
    for name in ("train/loss_scale", "train/skipped_steps", "train/loss"):
        assert set(logged[name]) == set(range(1, 9)), name
        assert {s: again[name][s] for s in range(5, 9)} == \
            {s: logged[name][s] for s in range(5, 9)}, (name, logged[name], again[name])
    skipped = logged["train/skipped_steps"]
    assert skipped[4] >= 1 and skipped[8] > skipped[4], skipped  # skips before and after
    assert len(set(logged["train/loss_scale"].values())) >= 2, logged["train/loss_scale"]
    assert logged["train/loss_scale"][4] != 2.0**20
    # a skipped step has no gradient norm to show
    skipped_at = {s for s in range(1, 9) if skipped[s] > skipped.get(s - 1, 0)}
    assert set(logged["train/grad_norm"]) == set(range(1, 9)) - skipped_at

    log = (tmp_path / "straight" / "log.txt").read_text()
    line = next(line for line in log.splitlines() if line.startswith("step 8 | loss"))
    assert line.endswith(f"| loss scale {logged['train/loss_scale'][8]:,.0f} | skipped "
                         f"{skipped[8]:.0f}"), line


def test_auto_picks_bfloat16_on_a_cpu_and_float16_before_ampere(data_dir, tmp_path):
    def gpu(capability, kind):
        return SimpleNamespace(platform="gpu", compute_capability=capability, device_kind=kind)

    assert pick_compute_dtype(jax.devices("cpu")[0])[0] == "bfloat16"
    assert pick_compute_dtype(gpu("7.5", "Tesla T4"))[0] == "float16"
    assert pick_compute_dtype(gpu("7.0", "Tesla V100-SXM2-16GB"))[0] == "float16"
    assert pick_compute_dtype(gpu("8.0", "NVIDIA A100-SXM4-40GB"))[0] == "bfloat16"
    assert pick_compute_dtype(gpu("12.0", "NVIDIA RTX PRO 6000"))[0] == "bfloat16"  # not "1" < "8"
    assert pick_compute_dtype(gpu("gfx90a", "AMD Instinct MI210"))[0] == "bfloat16"  # ROCm
    dtype, why = pick_compute_dtype(gpu("7.5", "Tesla T4"))
    assert "7.5" in why and "loss scaling" in why

    # A run says what auto picked, and why; config.json keeps the pick. No loss scale on bfloat16.
    jax_device = jax.devices()[0]
    expected = pick_compute_dtype(jax_device)[0]
    config = in_dtype(tiny_config(data_dir, max_steps=2, eval_interval=2), "auto")
    train.train(config, tmp_path / "run")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"compute_dtype=auto: {expected} (" in log
    assert "loss scale" not in log and "train/loss_scale" not in scalars(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["model"]["compute_dtype"] == expected

    # eval.py and sample.py take float16 and auto for the run's weights
    for asked, expected_dtype in (("auto", expected), ("float16", "float16")):
        model, _, _ = eval_py.load(eval_py.parse_args([f"--rundir={tmp_path / 'run'}",
                                                       f"--dtype={asked}"]))
        assert model.config.compute_dtype == expected_dtype
        args = sample.parse_args([f"--rundir={tmp_path / 'run'}", f"--dtype={asked}"])
        assert args.dtype == asked
        assert sample.with_dtype(model, asked).config.compute_dtype == expected_dtype


# ---------------------------------------------------------------------------------------------
# Bad values


@pytest.mark.parametrize("override, words", [
    ("--loss_scale_init=0", ["loss_scale_init=0", "[1, 2**128)"]),
    ("--loss_scale_init=-65536", ["loss_scale_init=-65536", "[1, 2**128)"]),
    ("--loss_scale_growth_interval=0", ["loss_scale_growth_interval=0", ">= 1"]),
    ("--model.compute_dtype=float8", ["compute_dtype='float8'", "'float16'", "'auto'"]),
])
def test_bad_loss_scaling_values_are_refused_in_one_line(override, words, tmp_path, capsys):
    rundir = tmp_path / "run"
    one_line_error(lambda: launch.main(["--config=shakespeare_char_cpu", f"--rundir={rundir}",
                                        override]), capsys, *words)
    assert not rundir.exists()


def test_bench_times_the_dtype_auto_picks(data_dir, capsys):
    bench.main(["--config=shakespeare_char_cpu", f"--data_dir={data_dir}", "--steps=1",
                "--warmup=0", "--model.n_layer=1", "--model.n_embd=32", "--model.n_head=2",
                "--model.block_size=16", "--batch_size=2", "--model.compute_dtype=auto"])
    out = capsys.readouterr().out
    assert "compute_dtype=auto: bfloat16" in out and "| compute bfloat16 |" in out, out


def test_a_resume_may_trade_float32_for_bfloat16_but_not_change_what_float16_carries(data_dir,
                                                                                     tmp_path):
    rundir = tmp_path / "run"
    train.train(tiny_config(data_dir, max_steps=2, eval_interval=2), rundir)  # float32
    with pytest.raises(UserError, match="loss_scale_init=65536.0, and loss_scale_init=1024.0 "
                                        "cannot take effect on resume"):
        train.train(tiny_config(data_dir, max_steps=4, eval_interval=2, loss_scale_init=1024.0),
                    rundir)
    # the same optimizer state in another precision: it resumes, and the change is on record
    train.train(in_dtype(tiny_config(data_dir, max_steps=4, eval_interval=2), "bfloat16"), rundir)
    assert "model.compute_dtype 'float32' -> 'bfloat16'" in (rundir / "log.txt").read_text()
    history = json.loads((rundir / "config.json").read_text())["history"]
    assert history[-1]["changes"]["model.compute_dtype"] == ["float32", "bfloat16"], history
    # float16's optimizer state carries a loss scale the checkpoint has not: refused, kept
    kept = {p: p.read_bytes() for p in rundir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="compute_dtype='bfloat16', and 'float16' cannot take "
                                        "effect on resume"):
        train.train(in_dtype(tiny_config(data_dir, max_steps=6, eval_interval=2), "float16"),
                    rundir)
    assert {p: p.read_bytes() for p in rundir.rglob("*") if p.is_file()} == kept


# ---------------------------------------------------------------------------------------------
# Sharded: the overflow check and the scale are global, over every shard of the gradients

SHARDED_FLOAT16 = """
import dataclasses, sys, numpy as np, jax
sys.path.insert(0, {repo!r})
import sharding, train
from config import TrainConfig
from model import GPTConfig
assert len(jax.devices()) == 4
config = TrainConfig(model=GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4,
                                     n_embd=64, compute_dtype="float16"),
                     batch_size=8, optimizer="adamw", warmup_steps=0, max_steps=10,
                     fsdp_min_size=0, loss_scale_growth_interval=1000)
tokens = np.random.default_rng(0).integers(0, 64, (6, 1, 8, 17), dtype=np.int32)

def run(config, steps):
    mesh = sharding.make_mesh(config)
    params, opt_state, step = train.new_state_and_step(config, mesh)
    initial = [np.array(a) for a in jax.tree.leaves(params)]  # the step donates its inputs
    rows, seen = sharding.batch_sharding(mesh), []
    for i in range(steps):
        x, y = (jax.device_put(a, rows) for a in (tokens[i, :, :, :-1], tokens[i, :, :, 1:]))
        params, opt_state, m = step(params, opt_state, x, y, np.int32(i), np.zeros(2, np.uint32))
        seen.append((float(m["loss_scale"]), bool(m["skipped"]), float(m["loss"])))
    sharded = sum(not a.sharding.is_fully_replicated for a in jax.tree.leaves(params))
    moved = max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(params), initial))
    return [np.asarray(a) for a in jax.tree.leaves(params)], seen, sharded, moved

result = {{}}
# 2**24: 8x the scale at which these gradients overflow float16 (2**21, at times 2**20): every
# step is skipped. 2**10: none is
for scale, steps in ((2.0**24, 2), (2.0**10, 6)):
    one = run(dataclasses.replace(config, fsdp=1, loss_scale_init=scale), steps)
    four = run(dataclasses.replace(config, loss_scale_init=scale), steps)
    result[scale] = dict(seen=[one[1], four[1]], sharded=[one[2], four[2]], moved=[one[3], four[3]],
                         diff=max(float(np.abs(a - b).max()) for a, b in zip(one[0], four[0])))
print("RESULT", repr(result))
"""


@pytest.mark.slow
def test_float16_over_4_fsdp_shards_skips_and_scales_as_one_device():
    result = run(["-c", SHARDED_FLOAT16.format(repo=str(REPO))], env=fake_devices(4), check=True)
    result = ast.literal_eval(result.stdout.split("RESULT")[1].strip())
    overflowing, finite = result[2.0**24], result[2.0**10]
    for case in (overflowing, finite):
        assert case["sharded"][0] == 0 and case["sharded"][1] > 0, case  # fsdp=4 shards the weights
    # an overflow anywhere skips the step on every shard: nothing moves, the scale halves
    for seen in overflowing["seen"]:
        assert [(scale, skipped) for scale, skipped, _ in seen] == [(2.0**23, True), (2.0**22, True)]
    assert overflowing["moved"] == [0, 0] and overflowing["diff"] == 0
    # finite steps: none skipped, and four shards train as one device (float16's products summed
    # in another order: a few float16 ulps in the losses, 1e-3 in the weights after 6 steps)
    one, four = finite["seen"]
    assert not any(skipped for _, skipped, _ in one + four), finite
    np.testing.assert_allclose([loss for *_, loss in four], [loss for *_, loss in one], rtol=1e-4)
    assert min(finite["moved"]) > 1e-3 and finite["diff"] < 1e-2, finite
