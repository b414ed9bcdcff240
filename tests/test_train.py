"""Training: the launch command end to end, resume, sharding, multi-host, optimizer, bad input.

The end-to-end tests run real (tiny) trainings on Tiny Shakespeare from ../shared; they are
marked `slow` (about a minute together on 2 cores). Fake devices need XLA_FLAGS set before jax
is imported, so the multi-device and multi-host checks run in subprocesses.
"""

import dataclasses
import io
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import checkpoints
import data
import cli
import launch
import optim
import sharding
import train
from config import TrainConfig, with_data_vocab
from conftest import fake_devices
from model import GPT, flops_per_token
from test_bad_input import one_line_error

REPO = Path(__file__).resolve().parents[1]
# Small enough to compile and run in seconds; float32 so runs on different meshes agree closely.
# warmup_steps=2: these runs of a few steps reach the peak learning rate.
TINY_OVERRIDES = ["--model.n_layer=2", "--model.n_embd=64", "--model.n_head=4",
                  "--model.block_size=32", "--batch_size=8", "--eval_iters=2", "--log_interval=1",
                  "--warmup_steps=2"]
# For the tests of how a run stops or what it caches, not of what it computes: AdamW without the
# lookup tables compiles in about three quarters of the recipe's time, in every process (process
# 1 of two reads no cached programs: a two-process launch 7.4 s instead of 9.1, BENCHMARKS.md).
LIGHT = ["--optimizer=adamw", "--model.value_embeds=false", "--model.bigram_embed=false"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shakespeare_input) -> str:
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    run([REPO / "prepare_shakespeare.py", "--input", shakespeare_input, "--out_dir", out], check=True)
    return str(out)


def run(args, env=None, check=False) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def launch_argv(data_dir, rundir, *overrides) -> list[str]:
    return ["--config=shakespeare_char_cpu", f"--data_dir={data_dir}", f"--rundir={rundir}",
            *TINY_OVERRIDES, *overrides]


def launch_run(data_dir, rundir, *overrides, check=True, env=None):
    return run([REPO / "launch.py", *launch_argv(data_dir, rundir, *overrides)], env=env,
               check=check)


def tiny_config(data_dir, **changes) -> TrainConfig:
    """The tiny config on data_dir, its vocabulary the data's as train.train resolves it."""
    config = cli.apply_overrides(cli.load_config("shakespeare_char_cpu", TrainConfig),
                                 [f"--data_dir={data_dir}", *TINY_OVERRIDES])
    return dataclasses.replace(with_data_vocab(config, data.load_meta(data_dir)), **changes)


def params_of(model) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


def scalars(rundir) -> dict[str, dict[int, float]]:
    """Every scalar in the run's TensorBoard event files, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(rundir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def files_in(rundir) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in Path(rundir).rglob("*") if p.is_file()}


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# In-process: optimizer, accumulation, compile count


def test_weight_decay_shrinks_only_matrices(data_dir):
    # With zero gradients AdamW's update is the decay alone: matrices shrink, norm gains do not.
    config = tiny_config(data_dir, weight_decay=0.5, warmup_steps=0, learning_rate=0.1)
    mesh = sharding.make_mesh(config)
    abstract_params, abstract_opt, static, optimizer = train.abstract_state(config, mesh)
    params, opt_state = train.init_state(config, abstract_params, abstract_opt, optimizer)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, opt_state, params)  # eager: ~700 small compiles
    assert float(jnp.abs(updates.blocks.attn.qkv.weight).max()) > 0
    assert float(jnp.abs(updates.blocks.attn_norm.weight).max()) == 0


@pytest.mark.parametrize("lr_decay_steps", [60, 0])  # 0: the cosine ends at max_steps
def test_learning_rate_schedule_at_chosen_steps(lr_decay_steps):
    peak, floor, warmup, max_steps = 1e-3, 1e-4, 10, 100
    config = TrainConfig(learning_rate=peak, min_lr=floor, warmup_steps=warmup,
                               max_steps=max_steps, lr_decay_steps=lr_decay_steps)
    end = lr_decay_steps or max_steps
    schedule = optim.lr_schedule(config)

    def cosine(step):  # from peak at the end of warmup down to min_lr at `end`
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (end - warmup)))

    expected = {0: 0.0, 3: 0.3 * peak, warmup: peak, (warmup + end) // 2: (peak + floor) / 2,
                warmup + 7: cosine(warmup + 7), end: floor, end - 1: cosine(end - 1)}
    if end < max_steps:
        expected[max_steps - 1] = floor  # after the cosine: held at min_lr
    for step, lr in expected.items():
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-5, atol=1e-12,
                                   err_msg=f"step {step}")


@pytest.mark.parametrize("lr_decay_steps", [150, 0])  # 0: the schedule's length is max_steps
def test_multi_token_weights_halve_with_distance_and_fade_the_furthest_first(lr_decay_steps):
    config = TrainConfig(multi_token=2, multi_token_until=2 / 3, max_steps=300,
                         lr_decay_steps=lr_decay_steps)
    length = 2 / 3 * (lr_decay_steps or 300)  # both weights reach 0 by here, the second at half
    weights = train.multi_token_schedule(config)
    expected = {0: [0.5, 0.25], length / 4: [0.375, 0.125], length / 2: [0.25, 0.0],
                length: [0.0, 0.0], 300: [0.0, 0.0]}
    for step, ahead in expected.items():
        np.testing.assert_allclose(weights(step), ahead, atol=1e-7, err_msg=f"step {step}")


def test_dropout_masks_change_with_the_step_and_repeat_on_a_rerun(data_dir):
    config = tiny_config(data_dir)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, dropout=0.3))
    mesh = sharding.make_mesh(config)
    abstract_params, abstract_opt, static, optimizer = train.abstract_state(config, mesh)
    train_step = train.make_train_step(config, optimizer, abstract_params, abstract_opt, static)
    tokens, targets = np.random.default_rng(0).integers(0, 65, (2, 1, 8, 32), dtype=np.int32)
    key_data = np.asarray(jr.key_data(jr.key(config.seed)))

    def loss_at(step):  # the loss is computed before the update: only dropout's key can move it
        # fresh each time: the step donates its inputs
        params, opt_state = train.init_state(config, abstract_params, abstract_opt, optimizer)
        _, _, metrics = train_step(params, opt_state, tokens, targets, np.int32(step), key_data)
        return float(metrics["loss"])

    assert loss_at(5) == loss_at(5)  # a rerun (a resume) draws the same masks
    assert loss_at(5) != loss_at(6)  # the next step draws new ones


def test_grad_accumulation_4x16_equals_one_batch_of_64(data_dir):
    def one_step(batch_size, grad_accum, tokens, targets):
        config = tiny_config(data_dir, batch_size=batch_size, grad_accum=grad_accum)
        mesh = sharding.make_mesh(config)
        abstract_params, abstract_opt, static, optimizer = train.abstract_state(config, mesh)
        params, opt_state = train.init_state(config, abstract_params, abstract_opt, optimizer)
        step = train.make_train_step(config, optimizer, abstract_params, abstract_opt, static)
        shape = (grad_accum, batch_size, tokens.shape[-1])
        params, _, metrics = step(params, opt_state, tokens.reshape(shape), targets.reshape(shape),
                                  np.int32(5), np.zeros(2, np.uint32))
        return eqx.combine(params, static), metrics

    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, 65, (2, 64, 32), dtype=np.int32)
    whole, whole_metrics = one_step(64, 1, tokens, targets)
    accumulated, accumulated_metrics = one_step(16, 4, tokens, targets)
    np.testing.assert_allclose(whole_metrics["loss"], accumulated_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(whole_metrics["grad_norm"], accumulated_metrics["grad_norm"], rtol=1e-5)
    for a, b in zip(params_of(whole), params_of(accumulated)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_initialisation_compiled_unoptimised_draws_the_optimised_weights_to_2_ulps(data_dir):
    config = tiny_config(data_dir)
    make_params = lambda key: eqx.filter(GPT(config.model, key=key), eqx.is_array)  # noqa: E731
    key = jr.key(config.seed)
    fast_compile = train.run_once(make_params, None, key)
    optimised = jax.jit(make_params).lower(key).compile({"xla_backend_optimization_level": 2})(key)
    for a, b in zip(jax.tree.leaves(fast_compile), jax.tree.leaves(optimised)):
        np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=2)


def test_only_small_programs_run_once_are_compiled_unoptimised(monkeypatch):
    options = []
    compile_lowered = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, compiler_options=None:
                        options.append(compiler_options) or compile_lowered(self, compiler_options))
    largest_small = train.RUN_ONCE_UNOPTIMISED_UP_TO
    small = train.run_once(lambda: jnp.ones(largest_small, jnp.int8), None)
    large = train.run_once(lambda: (jnp.ones(largest_small, jnp.int8), jnp.ones(1)), None)
    assert options == [train.UNOPTIMISED, None]
    assert int(small.sum()) == largest_small and float(large[1][0]) == 1.0


def test_whole_run_compiles_each_step_once_and_evaluates_the_same_batches(data_dir, tmp_path,
                                                                          caplog, monkeypatch):
    evaluated = []  # the stacked token batches of every eval_step call, in order
    eval_step = train.eval_step
    monkeypatch.setattr(train, "eval_step", lambda model, tokens, targets: evaluated.append(
        np.asarray(tokens)) or eval_step(model, tokens, targets))
    config = tiny_config(data_dir, max_steps=12, eval_interval=5, log_interval=3)
    jax.clear_caches()  # an identical step compiled by an earlier test would not be logged
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        train.train(config, tmp_path / "run")
    compiles = [r.message for r in caplog.records if r.message.startswith("Compiling jit(")]
    assert sum("jit(train_step)" in m for m in compiles) == 1, compiles
    assert sum("jit(eval_step)" in m for m in compiles) == 1, compiles  # evals reuse one too
    # Evaluations at steps 5, 10 and 12, each one call per split over eval_iters batches
    assert len(evaluated) == 3 * 2
    assert all(t.shape == (config.eval_iters, config.batch_size, config.model.block_size)
               for t in evaluated)
    first = evaluated[:2]
    for split in first:
        assert not np.array_equal(split[0], split[1])  # eval_iters different batches...
    assert not np.array_equal(first[0], first[1])  # ...other ones for each split...
    for later in (evaluated[2:4], evaluated[4:]):
        for a, b in zip(first, later):
            np.testing.assert_array_equal(a, b)  # ...and the same ones at every evaluation


def test_the_loop_reads_the_device_only_through_its_log_and_eval_syncs(data_dir, tmp_path,
                                                                       monkeypatch):
    class Terminal(io.StringIO):  # a stdout that says it is a terminal: the progress bar is on
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    # A device array read by float(), bool(), int() or .item() waits for the device: the loop
    # must read its metrics only through check_finite and evaluate's jax.device_get, once per
    # log step and per evaluation. (jax's transfer guard would say so on a GPU, not on a CPU.)
    array_type = type(jnp.zeros(()))
    for method in ("__float__", "__bool__", "__int__", "item"):
        def refuse(self, *args, _name=method):
            raise AssertionError(f"{_name} of a device array: a host sync outside the log steps")
        monkeypatch.setattr(array_type, method, refuse)
    syncs = []
    monkeypatch.setattr(jax, "device_get", lambda x, get=jax.device_get: syncs.append(1) or get(x))
    config = tiny_config(data_dir, max_steps=12, eval_interval=6, log_interval=4, profile_steps=1)
    train.train(config, tmp_path / "run", debug=True)  # debug: no checkpoints to write
    # log steps, evals' flushes, 2 splits each, and the weights' norm checked before each save
    assert len(syncs) == 12 // 4 + 2 + 2 * (12 // 6) + 12 // 6
    shown = screen.getvalue()
    assert "compiling..." in shown and "training: 100%" in shown and "12/12" in shown
    assert "loss=" in shown and "tok_s=" in shown  # the postfix, from the log steps' metrics
    assert "step 12 | eval:" in shown and "step 4 | loss" not in shown  # step lines: log.txt only
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "\r" not in log and "it/s" not in log and "step/s" not in log  # no bar redraws
    assert "step 4 | loss" in log and "step 12 | eval:" in log
    # --debug: a profile of profile_steps steps after the compile, and no checkpoints
    assert "profile of steps 2-2 written to" in log
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_debug_run_shorter_than_its_profile_still_writes_the_profile(data_dir, tmp_path):
    config = tiny_config(data_dir, max_steps=3, eval_interval=3, profile_steps=5)
    train.train(config, tmp_path / "run", debug=True)
    assert "profile of steps 2-3 written to" in (tmp_path / "run" / "log.txt").read_text()
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))


@pytest.mark.slow
def test_launch_in_a_terminal_shows_a_progress_bar_and_keeps_log_txt_clean(data_dir, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    rundir = tmp_path / "run"
    args = [sys.executable, str(REPO / "launch.py"), "--config=shakespeare_char_cpu",
            f"--data_dir={data_dir}", f"--rundir={rundir}", *TINY_OVERRIDES, "--max_steps=20",
            "--eval_interval=10", "--log_interval=5"]
    process = subprocess.Popen(args, cwd=REPO, stdout=terminal, stderr=terminal)
    os.close(terminal)
    shown = b""
    while chunk := read_or_eof(main):
        shown += chunk
    assert process.wait(timeout=300) == 0, shown.decode(errors="replace")
    shown = shown.decode(errors="replace")
    for seen in ("compiling...", "training: 100%", "20/20", "eval val", "step 20 | eval:"):
        assert seen in shown, seen
    log = (rundir / "log.txt").read_text()
    assert "\r" not in log and "step 20 | loss" in log and "step 20 | eval:" in log


def read_or_eof(fd) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the terminal's other end closed: Linux says EIO
        return b""


# ---------------------------------------------------------------------------------------------
# End to end through launch.py


@pytest.mark.slow
def test_launch_writes_checkpoints_events_and_config(data_dir, tmp_path):
    rundir = tmp_path / "run"
    result = launch_run(data_dir, rundir, "--max_steps=20", "--eval_interval=10")
    assert "step 20 | eval" in result.stdout

    saved = json.loads((rundir / "config.json").read_text())
    assert saved["config"]["max_steps"] == 20 and saved["config"]["model"]["n_layer"] == 2
    assert saved["data"]["train_sha256"] and saved["git_commit"]
    steps = sorted(int(p.name) for p in (rundir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20]

    logged = scalars(rundir)
    assert sorted(logged["train/loss"]) == list(range(1, 21))  # every step, read at log steps
    assert sorted(logged["perf/ms_per_step"]) == list(range(2, 21))  # step 1 is the compile
    assert set(logged["eval/val_loss"]) == {10, 20}
    assert logged["train/loss"][20] < logged["train/loss"][1]  # it learns
    # each step's lr is the schedule's at that step (logged 1-based), read back as float32
    schedule = optim.lr_schedule(checkpoints.read_run_config(rundir))
    np.testing.assert_allclose([logged["train/lr"][s] for s in range(1, 21)],
                               [float(schedule(s - 1)) for s in range(1, 21)], rtol=1e-6)
    assert (rundir / "log.txt").read_text().count("eval:") == 2


@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(data_dir, tmp_path):
    schedule = ["--lr_decay_steps=8", "--eval_interval=4", "--model.dropout=0.1"]
    launch_run(data_dir, tmp_path / "straight", "--max_steps=8", *schedule)
    launch_run(data_dir, tmp_path / "resumed", "--max_steps=4", *schedule)
    result = launch_run(data_dir, tmp_path / "resumed", "--max_steps=8", *schedule)
    assert "resuming at step 4" in result.stdout

    _, straight, _ = checkpoints.load_model(tmp_path / "straight")
    _, resumed, _ = checkpoints.load_model(tmp_path / "resumed")
    for a, b in zip(params_of(straight), params_of(resumed)):
        np.testing.assert_array_equal(a, b)  # bitwise: same batches, same dropout keys
    losses = scalars(tmp_path / "resumed")["train/loss"]
    assert {s: losses[s] for s in range(6, 9)} == \
        {s: scalars(tmp_path / "straight")["train/loss"][s] for s in range(6, 9)}


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    rundir = tmp_path / "run"
    launch_run(data_dir, rundir, "--max_steps=4", "--eval_interval=4")
    before = sorted(os.listdir(rundir / "checkpoints"))
    result = launch_run(data_dir, rundir, "--max_steps=30", "--eval_interval=4",
                        "--learning_rate=1e30", "--warmup_steps=0", "--grad_clip=0", check=False)
    assert_one_line_error(result, " is nan", "at step", "checkpoint (step 4) is kept")
    assert sorted(os.listdir(rundir / "checkpoints")) == before
    checkpoints.load_model(rundir)  # the kept checkpoint still loads


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing lost


@pytest.mark.slow
def test_bad_inputs_give_one_line_and_exit_2(data_dir, tmp_path, capsys):
    assert_one_line_error(run([REPO / "launch.py", "--config=nope"]), "no config file",
                          "shakespeare_char")
    # The rest in this process, as run_cli gives them (a process costs ~3 s of imports).
    def refused(data_dir, overrides, *words):
        argv = launch_argv(data_dir, tmp_path / "a", *overrides)
        one_line_error(lambda: launch.main(argv), capsys, *words)

    refused(data_dir, ["--no_such_key=1"], "no_such_key")
    refused(data_dir, ["--max_steps=ten"], "max_steps", "int")
    refused(data_dir, ["--model.n_head=5"], "n_head")
    refused(tmp_path / "nowhere" / "shakespeare_char", [], "prepare_shakespeare.py")
    refused(data_dir, ["--model.block_size=2000000"], "block_size")
    refused(data_dir, ["--model.vocab_size=10"], "vocab_size")
    assert not (tmp_path / "a").exists()  # nothing was written for refused runs


@pytest.mark.slow
def test_batch_that_does_not_divide_over_devices_is_refused(data_dir, tmp_path):
    result = launch_run(data_dir, tmp_path / "run", "--batch_size=6", check=False,
                        env=fake_devices(4))
    assert_one_line_error(result, "batch_size=6", "4 devices")


@pytest.mark.slow
def test_other_model_in_rundir_and_corrupt_checkpoint_are_refused_and_kept(data_dir, tmp_path,
                                                                          capsys):
    rundir = tmp_path / "run"
    launch_run(data_dir, rundir, "--max_steps=2", "--eval_interval=2")
    snapshot = files_in(rundir)

    argv = launch_argv(data_dir, rundir, "--max_steps=4", "--model.n_layer=3")
    one_line_error(lambda: launch.main(argv), capsys, "different model", "n_layer")
    assert files_in(rundir) == snapshot

    for path in (rundir / "checkpoints" / "2").rglob("*"):  # scribble over every array file
        if path.is_file() and path.suffix not in (".json",) and path.stat().st_size > 0:
            path.write_bytes(b"\0garbage" * 4)
    corrupted = files_in(rundir)
    result = launch_run(data_dir, rundir, "--max_steps=4", check=False)  # a process, as a user's
    assert_one_line_error(result, "cannot be read")
    assert files_in(rundir) == corrupted


# ---------------------------------------------------------------------------------------------
# Many devices, many hosts (subprocesses with fake CPU devices)


SHARDED_RUNS = """
import dataclasses, sys, numpy as np, jax, equinox as eqx
sys.path.insert(0, {repo!r})
import cli, train
from config import TrainConfig, with_data_vocab
base = cli.apply_overrides(cli.load_config("shakespeare_char_cpu", TrainConfig), {overrides!r})
base = dataclasses.replace(base, max_steps=3, eval_interval=3, fsdp_min_size=1024)
results = {{}}
for data_parallel, fsdp in [(1, 1), (2, 4)]:
    config = dataclasses.replace(base, data_parallel=data_parallel, fsdp=fsdp)
    model = train.train(config, f"{tmp}/run_{{data_parallel}}x{{fsdp}}")
    qkv = model.blocks.attn.qkv.weight  # (layers, 64, 192): 12,288 elements per layer
    shard = qkv.addressable_shards[0].data
    assert shard.size * fsdp == qkv.size, (shard.shape, qkv.shape)
    assert len(qkv.sharding.device_set) == data_parallel * fsdp
    results[(data_parallel, fsdp)] = [np.asarray(a) for a in
                                      jax.tree.leaves(eqx.filter(model, eqx.is_array))]
for mesh, params in results.items():
    for a, b in zip(results[(1, 1)], params):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=str(mesh))
print("SHARDED RUNS MATCH")
"""


@pytest.mark.slow
def test_fsdp_and_data_parallel_runs_match_one_device(data_dir, tmp_path):
    overrides = [f"--data_dir={data_dir}", *TINY_OVERRIDES]
    script = SHARDED_RUNS.format(repo=str(REPO), overrides=overrides, tmp=str(tmp_path))
    result = run(["-c", script], env={**fake_devices(8), "JAX_LOG_COMPILES": "1"})
    assert "SHARDED RUNS MATCH" in result.stdout, result.stdout + result.stderr
    # One compile of the step per mesh: the step's outputs keep the shardings its inputs came
    # with, so step 2 does not compile it again for the arrays step 1 returned.
    assert result.stderr.count("Compiling jit(train_step)") == 2, result.stderr[-3000:]
    # the losses logged along the way agree too
    reference = scalars(tmp_path / "run_1x1")["train/loss"]
    for step, value in scalars(tmp_path / "run_2x4")["train/loss"].items():
        assert abs(value - reference[step]) < 1e-5, step


@pytest.mark.slow
def test_help_lists_every_field_with_its_default():
    result = run([REPO / "launch.py", "--config=shakespeare_char", "--help"], check=True)
    for field in ("--max_steps=5000", "--model.n_layer=6", "--model.dropout=0.3",
                  "--learning_rate=0.001", "--fsdp=-1"):
        assert field in result.stdout, field
    assert "peak learning rate" in result.stdout  # the field's comment is its help


SAMPLER = {"seed": 0, "step": 0}  # a batch sampler's state, as a checkpoint saves it


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
    manager = checkpoints.checkpoint_manager(tmp_path, keep_last=2)
    params = {"w": jnp.ones(3)}
    for step, val_loss in enumerate([3.0, 1.0, 4.0, 5.0, 6.0], start=1):
        checkpoints.save_checkpoint(manager, step, params, params, SAMPLER, [0, 0], val_loss)
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [2, 4, 5]  # best (val 1.0) plus the last two
    assert checkpoints.choose_step(tmp_path, "best") == 2
    assert checkpoints.choose_step(tmp_path, "latest") == 5
    with pytest.raises(train.UserError, match="use auto, latest, best or one of"):
        checkpoints.choose_step(tmp_path, "3")


# bench.py with a known peak (1e8 FLOP/s per device) on two fake devices
BENCH_WITH_PEAK = """
import runpy, sys
sys.path.insert(0, {repo!r})
import train
train.PEAK_FLOPS = {{"cpu": 1e8}}
sys.argv = ["bench.py", *{args!r}]
runpy.run_path("bench.py", run_name="__main__")
"""


@pytest.mark.slow
def test_bench_reports_throughput_and_mfu_from_the_peak(tmp_path):
    args = ["--config=shakespeare_char_cpu", "--steps=2", "--warmup=1", "--model.vocab_size=65",
            *TINY_OVERRIDES]
    result = run(["-c", BENCH_WITH_PEAK.format(repo=str(REPO), args=args)],
                 env=fake_devices(2), check=True)
    assert "devices 2 x" in result.stdout and "tokens from" in result.stdout  # where batches came from
    measured = re.search(r"([\d.]+) ms/step \| ([\d,]+) tokens/s \| MFU ([\d.]+)%", result.stdout)
    assert measured, result.stdout
    ms_per_step, tokens_per_s, mfu = (float(x.replace(",", "")) for x in measured.groups())
    config = cli.apply_overrides(cli.load_config("shakespeare_char_cpu", TrainConfig),
                                 ["--model.vocab_size=65", *TINY_OVERRIDES])
    np.testing.assert_allclose(tokens_per_s, config.tokens_per_step / (ms_per_step / 1e3),
                               rtol=0.06 / ms_per_step)  # ms/step is printed to 0.1
    # MFU = achieved FLOP/s (6N + 12LdT per token, PaLM) over the peak of every device
    expected = tokens_per_s * flops_per_token(config.model) / (1e8 * 2)
    np.testing.assert_allclose(mfu / 100, expected, rtol=1e-3)
    assert_one_line_error(run([REPO / "bench.py", "--config=shakespeare_char_cpu", "--oops=1"]),
                          "oops")


def test_bench_says_when_its_compile_was_a_read_from_the_compilation_cache(tmp_path):
    args = [REPO / "bench.py", "--config=shakespeare_char_cpu", "--steps=1", "--warmup=0",
            "--model.vocab_size=65", *TINY_OVERRIDES]
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    first, second = (run(args, env=cache, check=True).stdout for _ in range(2))
    assert re.search(r"^compile [\d.]+s \|", first, re.M), first
    assert re.search(r"^read from the compilation cache in [\d.]+s \|", second, re.M), second


def save_step_1(rundir, params, opt_state) -> None:
    manager = checkpoints.checkpoint_manager(rundir, keep_last=2)
    checkpoints.save_checkpoint(manager, 1, params, opt_state, SAMPLER, [0, 0])
    manager.wait_until_finished()
    manager.close()


def damage_the_optimizer_state_of_step_1(rundir) -> None:
    """Its arrays' data overwritten, its layout still readable."""
    for path in (rundir / "checkpoints" / "1" / "opt_state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"\0garbage" * 4)


def test_a_checkpoint_of_another_optimizer_is_named_and_kept_a_damaged_one_called_damaged(tmp_path):
    params = {"w": jnp.ones(3)}
    abstract_params = jax.eval_shape(lambda: params)
    adam = optax.adam(1e-3)
    save_step_1(tmp_path, params, adam.init(params))
    reader = checkpoints.checkpoint_manager(tmp_path)
    checkpoints.restore_checkpoint(reader, 1, abstract_params, jax.eval_shape(adam.init, params))  # reads
    snapshot = files_in(tmp_path)

    # A healthy checkpoint, resumed with another optimizer: SGD's momentum instead of Adam's moments
    momentum = jax.eval_shape(optax.sgd(1e-3, momentum=0.9).init, params)
    with pytest.raises(train.UserError) as error:
        checkpoints.restore_checkpoint(reader, 1, abstract_params, momentum)
    message = str(error.value)
    for words in ("holds another optimizer state", "4 arrays differ",
                  "0.mu.w: (3,) saved, absent now", "Resume with the run's own settings",
                  "start a new --rundir", "nothing on disk was changed"):
        assert words in message, message
    assert "delete" not in message and "damaged" not in message, message
    assert files_in(tmp_path) == snapshot

    damage_the_optimizer_state_of_step_1(tmp_path)
    with pytest.raises(checkpoints.Damaged):
        checkpoints.restore_checkpoint(reader, 1, abstract_params, jax.eval_shape(adam.init, params))


def test_a_damaged_checkpoint_read_leaves_no_traceback_behind(tmp_path, monkeypatch):
    # A failed read ends orbax's event loop while other arrays are still being read; as each one
    # lands it reported "Event loop is closed" to sys.unraisablehook: a traceback on stderr each
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(unraisable))
    params = {f"w{i}": jnp.ones((256, 256)) for i in range(40)}
    adam = optax.adam(1e-3)
    abstract = jax.eval_shape(lambda: params), jax.eval_shape(adam.init, params)
    for attempt in range(3):
        rundir = tmp_path / str(attempt)
        save_step_1(rundir, params, adam.init(params))
        damage_the_optimizer_state_of_step_1(rundir)
        with pytest.raises(checkpoints.Damaged):
            checkpoints.restore_checkpoint(checkpoints.checkpoint_manager(rundir), 1, *abstract)
    time.sleep(1)  # the reads left in flight land
    assert not reported, [str(r.exc_value) for r in reported[:3]]
    sys.unraisablehook(types.SimpleNamespace(object="x", exc_value=ValueError("other")))
    assert len(reported) == 1  # any other report still reaches the hook


def test_a_resume_may_change_how_the_model_is_computed_not_what(data_dir, tmp_path):
    config = tiny_config(data_dir)
    checkpoints.write_json_atomic(tmp_path / "config.json", {"config": dataclasses.asdict(config)})
    for how in (dict(unroll_layers=not config.model.unroll_layers), dict(remat=False),
                dict(attention="xla"), dict(compute_dtype="bfloat16")):
        changed = dataclasses.replace(config, model=dataclasses.replace(config.model, **how))
        assert checkpoints.check_rundir(changed, tmp_path)  # accepted, and logged as a change
    # float16 alone keeps a loss scale in the optimizer state: not to or from it
    changed = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                    compute_dtype="float16"))
    with pytest.raises(train.UserError, match="compute_dtype='float32', and 'float16' cannot"):
        checkpoints.check_rundir(changed, tmp_path)
    for what in (dict(n_layer=3), dict(attn_dropout=0.1)):
        changed = dataclasses.replace(config, model=dataclasses.replace(config.model, **what))
        with pytest.raises(train.UserError, match=f"model.{next(iter(what))} differ"):
            checkpoints.check_rundir(changed, tmp_path)


def test_deterministic_switch_sets_xla_flag_before_the_backend_starts(tmp_path):
    script = ("import os, sys; sys.argv = ['launch.py', '--config=shakespeare_char_cpu', "
              "'--deterministic=true', '--data_dir=/nonexistent']; import launch\n"
              "try:\n    launch.main(sys.argv[1:])\nexcept launch.UserError:\n    pass\n"
              "print(os.environ['XLA_FLAGS'])")
    result = run(["-c", script], env={"XLA_FLAGS": ""}, check=True)
    assert "--xla_gpu_deterministic_ops=true" in result.stdout


# ---------------------------------------------------------------------------------------------
# Preemption, crashes and restarts


BAD_VALUES = [("--learning_rate=-1", "learning_rate"), ("--model.dropout=1.5", "dropout"),
              ("--model.n_layer=0", "n_layer"), ("--beta2=1.0", "beta2"),
              ("--min_lr=0.5", "min_lr"),
              ("--eval_iters=0", "eval_iters"), ("--multi_token=-1", "multi_token"),
              ("--multi_token=64", "multi_token"), ("--multi_token_until=0", "multi_token_until")]


@pytest.mark.parametrize("bad, field", BAD_VALUES)
def test_values_that_cannot_be_right_are_refused_naming_the_field(bad, field):
    with pytest.raises(train.UserError, match=f"{field}="):
        cli.apply_overrides(cli.load_config("shakespeare_char_cpu", TrainConfig), [bad])


def test_relations_are_checked_on_the_final_values_whatever_the_order():
    config = cli.load_config("shakespeare_char_cpu", TrainConfig)  # learning_rate=1e-3
    # min_lr=0.002 alone would exceed the peak; with the new peak it does not
    higher = cli.apply_overrides(config, ["--min_lr=0.002", "--learning_rate=0.01"])
    assert (higher.min_lr, higher.learning_rate) == (0.002, 0.01)


@pytest.mark.slow
def test_a_bad_value_is_one_line_exit_2_and_writes_nothing(data_dir, tmp_path):
    result = launch_run(data_dir, tmp_path / "run", "--learning_rate=-1", check=False)
    assert_one_line_error(result, "learning_rate")
    assert not (tmp_path / "run").exists()


def launch_popen(data_dir, rundir, *overrides) -> subprocess.Popen:
    args = [sys.executable, str(REPO / "launch.py"), "--config=shakespeare_char_cpu",
            f"--data_dir={data_dir}", f"--rundir={rundir}", *TINY_OVERRIDES, *overrides]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run_until(process: subprocess.Popen, marker: str, then) -> tuple[str, str]:
    """Reads the process's stdout until a line holds marker, calls then(process), returns
    (stdout, stderr) once it has ended."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            then(process)
            break
    out, err = process.communicate(timeout=300)
    return "".join(seen) + out, err


def assert_same_parameters(rundir_a, rundir_b):
    _, a, _ = checkpoints.load_model(rundir_a)
    _, b, _ = checkpoints.load_model(rundir_b)
    for x, y in zip(params_of(a), params_of(b)):
        np.testing.assert_array_equal(x, y)


INTERRUPTED = ["--max_steps=30", "--lr_decay_steps=30", "--eval_interval=5", "--model.dropout=0.1"]


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted run that the interrupted ones must end equal to."""
    rundir = tmp_path_factory.mktemp("straight") / "run"
    launch_run(data_dir, rundir, *INTERRUPTED)
    return rundir


# launch.py killed (SIGKILL, no cleanup) in the middle of saving the checkpoint of step 10: its
# arrays are written into orbax's temporary directory, which is not yet renamed into place.
KILLED_MID_SAVE = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize_or_die(self, *args, **kwargs):
    if self._final_path.name == "10":  # the step directory's own rename
        print("KILLED MID-SAVE", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die
sys.argv = ["launch.py", *{args!r}]
runpy.run_path("launch.py", run_name="__main__")
"""


@pytest.mark.slow
def test_kill_mid_save_and_at_any_moment_then_restarts_end_as_an_uninterrupted_run(
        data_dir, straight_run, tmp_path):
    rundir = tmp_path / "killed"
    args = ["--config=shakespeare_char_cpu", f"--data_dir={data_dir}", f"--rundir={rundir}",
            *TINY_OVERRIDES, *INTERRUPTED]
    killed = run(["-c", KILLED_MID_SAVE.format(repo=str(REPO), args=args)])
    assert killed.returncode == -signal.SIGKILL and "KILLED MID-SAVE" in killed.stdout, killed.stderr
    half_written = [p.name for p in (rundir / "checkpoints").iterdir()
                    if p.name.startswith("10.orbax-checkpoint-tmp")]
    assert len(half_written) == 1, list((rundir / "checkpoints").iterdir())
    assert checkpoints.checkpoint_manager(rundir).all_steps() == [5]  # the last complete one

    # The restart sets the half-written checkpoint aside and resumes from step 5; a kill -9 at
    # another moment (step 15's save may still be in flight) then loses only unsaved steps.
    out, err = run_until(launch_popen(data_dir, rundir, *INTERRUPTED), "step 17 |",
                         subprocess.Popen.kill)
    assert "Traceback" not in err, err
    aside = rundir / "incomplete_checkpoints"
    assert (f"incomplete checkpoints (a crash mid-save) moved to {aside}: step directories "
            f"{half_written[0]}") in out
    assert "resuming at step 5/30" in out
    moved = list(aside.iterdir())
    assert [p.name.startswith(half_written[0]) for p in moved] == [True]
    assert (moved[0] / "params").is_dir()  # moved whole, not deleted

    final = launch_run(data_dir, rundir, *INTERRUPTED, check=False)
    assert final.returncode == 0 and "Traceback" not in final.stderr, final.stderr
    assert re.search(r"resuming at step (10|15)/30", final.stdout), final.stdout
    assert_same_parameters(straight_run, rundir)


# launch.py whose save after a Ctrl-C is itself hit by a second Ctrl-C, sent from inside the
# save (orbax still writing it): the save must finish, and only then the line say it did.
SECOND_CTRL_C_MID_SAVE = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
import checkpoints
save = checkpoints.save_checkpoint

def save_then_ctrl_c(*args, **kwargs):
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)

checkpoints.save_checkpoint = save_then_ctrl_c
sys.argv = ["launch.py", *{args!r}]
runpy.run_path("launch.py", run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_saves_even_through_a_second_one_and_launch_with_only_rundir_resumes(
        data_dir, straight_run, tmp_path):
    rundir = tmp_path / "interrupted"
    # One evaluation, at step 30: a Ctrl-C anywhere before it has unsaved steps to save. Far
    # more steps than that, so a fast machine cannot finish the run before the signal lands
    # (lr_decay_steps fixes the schedule: the first 30 steps are those of the straight run).
    args = ["--config=shakespeare_char_cpu", f"--data_dir={data_dir}", f"--rundir={rundir}",
            *TINY_OVERRIDES, *INTERRUPTED, "--eval_interval=30", "--max_steps=100000"]
    process = subprocess.Popen([sys.executable, "-c", SECOND_CTRL_C_MID_SAVE.format(
        repo=str(REPO), args=args)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    out, err = run_until(process, "step 3 |", lambda p: p.send_signal(signal.SIGINT))
    assert process.returncode == 130 and "Traceback" not in err, err  # quietly, as Ctrl-C does
    assert "Ctrl-C again: saving the step in flight first" in err, err
    saved = re.search(r"interrupted at step (\d+): checkpoint saved \(on disk\); rerun with "
                      r"--rundir=\S+ to resume", out)
    assert saved, out
    step = int(saved.group(1))
    assert 3 <= step < 30 and checkpoints.checkpoint_manager(rundir).all_steps() == [step]
    assert (rundir / "checkpoints" / str(step) / checkpoints.CHECKSUMS).exists()  # whole, sealed

    # No --config, no overrides but max_steps: the run's config.json says how (data_dir, the
    # tiny model, the schedule); a run from the default config would end elsewhere or fail.
    resumed = run([REPO / "launch.py", f"--rundir={rundir}", "--max_steps=30"], check=True)
    assert f"resuming at step {step}/30" in resumed.stdout
    assert_same_parameters(straight_run, rundir)


@pytest.mark.slow
@pytest.mark.parametrize("sent", ["SIGTERM", "SIGHUP"])  # a preemption; a closed terminal
def test_sigterm_saves_exits_0_and_the_resumed_run_equals_an_uninterrupted_one(data_dir,
                                                                             straight_run, tmp_path,
                                                                             sent):
    steps = INTERRUPTED
    rundir = tmp_path / "preempted"
    process = launch_popen(data_dir, rundir, *steps)
    out, err = run_until(process, "step 3 |", lambda p: p.send_signal(getattr(signal, sent)))
    assert process.returncode == 0, err
    assert "Traceback" not in err, err
    stopped = re.search(rf"stopped by {sent} at step (\d+): checkpoint saved \(on disk\); rerun "
                        r"with --rundir=\S+ to resume", out)
    assert stopped, out
    assert 3 <= int(stopped.group(1)) < 30  # stopped early, after the step in flight
    assert int(stopped.group(1)) in checkpoints.checkpoint_manager(rundir).all_steps()

    resumed = launch_run(data_dir, rundir, *steps)
    assert f"resuming at step {stopped.group(1)}/30" in resumed.stdout
    assert_same_parameters(straight_run, rundir)


@pytest.mark.slow
def test_rerunning_a_finished_run_says_so_and_exits_0(data_dir, tmp_path):
    rundir = tmp_path / "run"
    launch_run(data_dir, rundir, "--max_steps=4", "--eval_interval=4")
    before = files_in(rundir)
    again = launch_run(data_dir, rundir, "--max_steps=4", "--eval_interval=4", check=False)
    assert again.returncode == 0 and again.stderr.strip() == "", again.stderr
    assert again.stdout.strip().splitlines() == [
        f"nothing to do: {rundir} is at step 4 of max_steps=4 (raise --max_steps to train on)"]
    assert files_in(rundir) == before


def test_incomplete_checkpoints_are_set_aside_and_the_newest_complete_one_is_used(tmp_path):
    manager = checkpoints.checkpoint_manager(tmp_path, keep_last=5)
    params = {"w": jnp.ones(3)}
    for step in (1, 2, 3):
        checkpoints.save_checkpoint(manager, step, params, params, SAMPLER, [0, 0])
    manager.wait_until_finished()
    manager.close()
    directory = tmp_path / "checkpoints"
    assert all((directory / str(s) / checkpoints.COMMIT_MARKER).exists() for s in (1, 2, 3))
    (directory / "3" / checkpoints.COMMIT_MARKER).unlink()  # as if the save never finished
    (directory / "4.orbax-checkpoint-tmp-1234567").mkdir()  # a save cut off in its temp dir
    assert checkpoints.set_aside_incomplete_checkpoints(tmp_path) == ["3", "4.orbax-checkpoint-tmp-1234567"]
    assert checkpoints.checkpoint_manager(tmp_path).latest_step() == 2
    aside = sorted(p.name for p in (tmp_path / "incomplete_checkpoints").iterdir())
    assert [name.split("-")[0] for name in aside] == ["3", "4.orbax"]  # moved, not deleted


def test_plot_run_reads_every_logged_scalar_and_says_when_matplotlib_is_missing(tmp_path):
    import plot_run
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(tmp_path)) as writer:
        for step in range(1, 4):
            writer.add_scalar("train/loss", 4.0 - step, step)
        writer.add_scalar("eval/val_loss", 2.5, 3)
    scalars = plot_run.read_scalars(tmp_path)
    assert scalars["train/loss"] == ([1, 2, 3], [3.0, 2.0, 1.0])
    assert scalars["eval/val_loss"] == ([3], [2.5])
    with pytest.raises(train.UserError, match="no TensorBoard events"):
        plot_run.read_scalars(tmp_path / "empty")
    # matplotlib is this script's own optional dependency: without it, one line and exit 2
    script = ("import sys, runpy; sys.modules['matplotlib'] = None; "
              f"sys.argv = ['plot_run.py', '--rundir={tmp_path}']; "
              "runpy.run_path('plot_run.py', run_name='__main__')")
    assert_one_line_error(run(["-c", script]), "pip install matplotlib")


def test_a_config_that_leaves_vocab_size_unset_takes_the_datas_and_logs_it(tmp_path):
    chars = "abcdefghijkl"  # another character corpus than the config's: 12 characters, not 65
    rng = np.random.default_rng(0)
    data.write_dataset(tmp_path / "data", rng.integers(0, 12, 2000), rng.integers(0, 12, 500),
                       {"tokenizer": "char", "chars": chars, "vocab_size": 12, "source": "test"})
    config = cli.apply_overrides(cli.load_config("shakespeare_char_cpu", TrainConfig),
                                 [f"--data_dir={tmp_path / 'data'}", *TINY_OVERRIDES,
                                  "--max_steps=2", "--eval_interval=2"])
    assert config.model.vocab_size == 0  # the character configs leave it unset
    model = train.train(config, tmp_path / "run")
    assert model.embed.shape[0] == 12
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"model.vocab_size=12: the data's (from {tmp_path / 'data' / 'meta.json'}, char tokens)" in log
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert saved["model"]["vocab_size"] == 12  # resolved: a resume and sample.py read it back
    # a value the config sets is kept and still checked against the data
    too_small = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=8))
    with pytest.raises(train.UserError, match="smaller than the data's vocabulary"):
        train.train(too_small, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_short_run_is_never_refused_for_its_warmup_and_says_so(data_dir, tmp_path):
    config = tiny_config(data_dir, max_steps=3, warmup_steps=100, eval_interval=3)
    train.train(config, tmp_path / "run")  # the config's warmup is longer than the run
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "warmup_steps=100 >= max_steps=3: the run ends inside the warmup" in log, log
    assert "step 3 | eval" in log
    lr = scalars(tmp_path / "run")["train/lr"]
    assert 0 < lr[3] < 0.05 * config.learning_rate  # 2 of 100 warmup steps


def test_the_progress_bar_keeps_a_width_on_a_terminal_that_reports_none(monkeypatch):
    import fcntl
    import pty
    import struct
    import termios

    from tqdm import tqdm

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 0, 0, 0))  # 0 columns
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stdout", terminal)
        bar = tqdm(total=10, file=terminal, **cli.bar_width())
        bar.update(5)
        bar.close()
    # a pty hands its output over asynchronously: read until the closing bar's newline arrives
    shown, deadline = "", time.monotonic() + 10
    while "\n" not in shown and time.monotonic() < deadline:
        if select.select([leader], [], [], 0.1)[0]:
            shown += os.read(leader, 4096).decode()
    os.close(leader)
    assert "50%" in shown and "█" in shown, shown  # a bar, not an empty line


def test_the_event_writer_never_imports_torch(tmp_path):
    """tensorboardX imports torch whenever it is installed: seconds of every start. A stand-in
    torch module on the path records any import of it."""
    fake, marker = tmp_path / "fake", tmp_path / "torch_was_imported"
    fake.mkdir()
    (fake / "torch.py").write_text(f"open({str(marker)!r}, 'w').close()\nTensor = type('T', (), {{}})\n")
    script = (f"import os, sys; sys.path.insert(0, {str(fake)!r}); import train; "
              f"w = train.summary_writer(train.Path({str(tmp_path / 'run')!r})); "
              f"w.add_scalar('loss', 1.0, 1); w.close(); print(os.path.exists({str(marker)!r})); "
              f"import torch; print(os.path.exists({str(marker)!r}))")
    result = run(["-c", script])
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    # not imported by the writer; still importable by the user's code afterwards
    assert result.stdout.split() == ["False", "True"], result.stdout
