"""Training: the state, the step, and the loop.

Read top to bottom: the model and optimizer state, created or restored already sharded -> the
train and eval steps -> throughput -> `train(config, rundir)`, the loop. The settings are
config.TrainConfig, the optimizer optim.py, the mesh and FSDP rule sharding.py, and the run
directory (config.json, checkpoints, resume rules) checkpoints.py; `launch.py` is the command
line on top of `train`.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import sys
import time
import types
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from tqdm import tqdm

import checkpoints
import data
import evaluation
import gpt2
import memory
from cli import UserError, bar_width
from config import TrainConfig, with_data_vocab
from model import GPT, flops_per_token, loss_fn, multi_token_loss, num_params, with_picked_dtype
from optim import loss_scale, loss_scale_metrics, lr_schedule, make_optimizer
from sharding import abstract_model, batch_sharding, make_mesh, shardings_of, with_shardings

# jax's note when a donated buffer has no output to alias: not a fault, and the step is compiled
# on a second thread, where catching it for that one call would not be thread-safe
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def check_attention(config) -> None:
    """attention="cudnn" runs only on NVIDIA GPUs: say so before the run directory is made."""
    if config.model.attention == "cudnn" and jax.devices()[0].platform != "gpu":
        raise UserError(f"model.attention=cudnn needs an NVIDIA GPU with cuDNN, and this machine "
                        f"runs on {jax.devices()[0].platform}: use --model.attention=auto or xla")


# ---------------------------------------------------------------------------------------------
# Model and optimizer state, created or restored already sharded


def abstract_state(config: TrainConfig, mesh):
    """Shapes, dtypes and shardings of (params, opt_state), plus the model's static part."""
    params, static = abstract_model(config.model, mesh, config.fsdp_min_size)
    optimizer = make_optimizer(config)
    opt_state = with_shardings(jax.eval_shape(optimizer.init, params), mesh, config.fsdp_min_size)
    return params, opt_state, static, optimizer


def init_state(config: TrainConfig, abstract_params, abstract_opt, optimizer):
    """Initialises every parameter directly into its shard: no device ever holds the whole model.
    With init_from, the parameters are GPT-2's, read on the host and placed into their shards."""
    if config.init_from:
        pretrained, _ = gpt2.load(config.init_from, config.model)
        params = jax.device_put(eqx.filter(pretrained, eqx.is_array), shardings_of(abstract_params))
    else:
        make_params = lambda key: eqx.filter(GPT(config.model, key=key), eqx.is_array)  # noqa: E731
        params = run_once(make_params, shardings_of(abstract_params), jr.key(config.seed))
    opt_state = run_once(optimizer.init, shardings_of(abstract_opt), params)
    return params, opt_state


# Outputs up to this many elements are made by a program compiled with LLVM's optimisations off,
# and on a CPU by XLA's older fusion emitters: the same draws, bit for bit, compiled in half the time
# (BENCHMARKS.md round 8, "The start").
RUN_ONCE_UNOPTIMISED_UP_TO = 2**24
UNOPTIMISED = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def run_once(fn, out_shardings, *args):
    """fn(*args), compiled with LLVM's optimisations off when its outputs are small: a program
    run once is then mostly its compile, and this halves it (BENCHMARKS.md round 5, "The start").
    Larger, its run is the cost: GPT-2 124M's initial draws take 6.1 s unoptimised and 3.0 s
    optimised, compile included (BENCHMARKS.md round 6). The normal sampler's draws can differ
    from an optimised compile's by up to 2 ulps (tests/test_train.py)."""
    lowered = jax.jit(fn, out_shardings=out_shardings).lower(*args)
    elements = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(lowered.out_info))
    small = elements <= RUN_ONCE_UNOPTIMISED_UP_TO
    return lowered.compile(UNOPTIMISED if small else None)(*args)


# ---------------------------------------------------------------------------------------------
# The step

def multi_token_schedule(config: TrainConfig):
    """step -> the weights of the targets 2..1+multi_token tokens ahead (model.multi_token_loss):
    0.5**i for the i-th further one, each falling linearly to 0, the furthest first, by
    multi_token_until of the schedule's length, as the speedrun's [1, 0.5, 0.25] -> [1, 0.5] ->
    [1] by two thirds of its run."""
    ahead = np.arange(1, config.multi_token + 1)  # host constants: no eager op at start-up
    length = config.multi_token_until * (config.lr_decay_steps or config.max_steps)
    ends = length * (config.multi_token - ahead + 1) / max(config.multi_token, 1)
    return lambda step: 0.5**ahead * jnp.clip(1 - step / ends, 0, 1)


def make_train_step(config: TrainConfig, optimizer, abstract_params, abstract_opt, static):
    """train_step(params, opt_state, tokens, targets, step, key_data) -> (params, opt_state,
    metrics): the model's arrays in and out, its static half (static) closed over. jax.jit on
    arrays alone: eqx.filter_jit sorts every argument's leaves on each call, ~1 ms of host time
    a call, and the CPU step ran 4.5 ms faster without it (BENCHMARKS.md round 6)."""
    schedule, ahead_weights = lr_schedule(config), multi_token_schedule(config)
    param_shardings, opt_shardings = shardings_of(abstract_params), shardings_of(abstract_opt)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, tokens, targets, step, key_data):
        """One optimizer step over grad_accum micro-batches; metrics stay on device."""
        model = eqx.combine(params, static)
        key = jr.fold_in(jr.wrap_key_data(key_data), step)  # dropout: a function of (seed, step)
        scale = loss_scale(opt_state)  # None but under float16 compute

        def objective(model, x, y, micro_key):  # (what the gradients follow, the loss logged)
            if config.multi_token:
                return multi_token_loss(model, x, y, ahead_weights(step), key=micro_key)
            loss = loss_fn(model, x, y, key=micro_key)
            return loss, loss

        def loss_and_grads(x, y, micro_key):
            def scaled(model):  # float16: gradients scaled up past its smallest numbers
                value, loss = objective(model, x, y, micro_key)
                return (value if scale is None else value * scale), loss

            (_, loss), grads = eqx.filter_value_and_grad(scaled, has_aux=True)(model)
            return loss, grads

        def accumulate(grad_sum, micro_batch):
            loss, grads = loss_and_grads(*micro_batch)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        micro_keys = jr.split(key, config.grad_accum)
        if config.grad_accum == 1:  # no accumulator to zero, carry and copy through a loop
            losses, grads = loss_and_grads(tokens[0], targets[0], micro_keys[0])
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            grad_sum, losses = jax.lax.scan(accumulate, zeros, (tokens, targets, micro_keys))
            grads = jax.tree.map(lambda g: g / config.grad_accum, grad_sum)
        if scale is not None:  # in float32, as the parameters: the true gradients, or not finite
            grads = jax.tree.map(lambda g: g / scale, grads)
        # Gradients land sharded like their parameters (a reduce-scatter, not an all-reduce).
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = eqx.apply_updates(params, updates)
        # The optimizer state keeps the FSDP rule's placement (XLA would split some small arrays it
        # was given whole): step 2's inputs match step 1's, so the step is compiled once, not twice.
        opt_state = jax.lax.with_sharding_constraint(opt_state, opt_shardings)
        grad_norm = optax.tree_utils.tree_norm(grads)
        metrics = {"loss": losses.mean(), "grad_norm": grad_norm, "lr": schedule(step)}
        if scale is not None:
            metrics |= loss_scale_metrics(opt_state)
        return params, opt_state, metrics

    return train_step


def new_state_and_step(config: TrainConfig, mesh):
    """(params, opt_state, train_step) of a new run on mesh: the step and its first state without
    train()'s loop, for stepping by hand (bench.py, the tests)."""
    abstract_params, abstract_opt, static, optimizer = abstract_state(config, mesh)
    params, opt_state = init_state(config, abstract_params, abstract_opt, optimizer)
    return params, opt_state, make_train_step(config, optimizer, abstract_params, abstract_opt,
                                              static)


@contextlib.contextmanager
def compiling_ahead(config: TrainConfig, train_step, abstract, mesh, manager=None):
    """A future of train_step compiled for the arguments the loop will give it (shapes, dtypes,
    shardings), before they exist; its first call then finds the program. Traced here, under this
    thread's jax settings, and compiled by XLA on a second thread while the caller goes on: the
    first step came 0.6-0.8 s sooner on 2 cores (BENCHMARKS.md round 8, "The start"). A run whose
    newest checkpoint is at max_steps is compiled when the result is first asked for (a damaged
    checkpoint can set it back), so a run with nothing to do does not wait at exit for a compile it
    never uses. The result is None for a step wrapped in a plain function (no .lower): its first
    call compiles it."""
    finished = manager is not None and (manager.latest_step() or 0) >= config.max_steps

    def lower_step():
        if not hasattr(train_step, "lower"):
            return None
        abstract_params, abstract_opt, _, _ = abstract
        tokens = jax.ShapeDtypeStruct(
            (config.grad_accum, config.batch_size, config.model.block_size), jnp.int32,
            sharding=batch_sharding(mesh))
        key_data = jax.eval_shape(lambda: jr.key_data(jr.key(0)))
        step = jax.ShapeDtypeStruct((), jnp.int32)
        return train_step.lower(abstract_params, abstract_opt, tokens, tokens, step, key_data)

    def compile_lowered(lowered):
        return lowered and lowered.compile()

    if finished:
        yield types.SimpleNamespace(result=lambda: compile_lowered(lower_step()))
        return
    lowered = lower_step()
    compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_step")
    try:
        yield compiler.submit(compile_lowered, lowered)
    finally:  # the caller goes on; the interpreter's exit still waits for a compile under way
        compiler.shutdown(wait=False, cancel_futures=True)


@eqx.filter_jit
def eval_step(model, tokens, targets):
    """The mean loss of a stack of batches, (batches, batch, seq): one call, the batches one after
    the other (lax.map), so it holds one batch's activations at a time."""
    return jnp.mean(jax.lax.map(lambda batch: loss_fn(model, *batch), (tokens, targets)))


def evaluate(model, samplers: dict, config: TrainConfig, to_global, show=False) -> dict[str, float]:
    """Mean loss over the same eval_iters batches of each split every time: comparable over a run.
    One call per split: a call per batch made five evaluations of shakespeare_char_cpu take 3.0 s
    against 2.5 s (BENCHMARKS.md, "round 7"). show: a short progress bar, a split at a time."""
    losses = {}
    splits = tqdm(samplers.items(), desc="eval", unit="split", leave=False, file=sys.stdout,
                  disable=not show, **bar_width())
    for split, sampler in splits:
        splits.set_description(f"eval {split}")
        batches = [sampler.batch(i) for i in range(config.eval_iters)]  # each (1, rows, seq)
        tokens, targets = (to_global(np.concatenate(part)) for part in zip(*batches))
        losses[split] = jax.device_get(eval_step(model, tokens, targets)).item()  # one sync
    return losses


# ---------------------------------------------------------------------------------------------
# Throughput, as the loop logs it and bench.py prints it


# Per device, from datasheets: dense bf16 peak FLOP/s (for MFU) and memory bandwidth in bytes/s
# (bench.py --decode's bound). A device not listed (a CPU) reports neither.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
MEMORY_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def this_device(table: dict) -> float | None:
    """This machine's entry in PEAK_FLOPS or MEMORY_BANDWIDTH, or None."""
    kind = jax.devices()[0].device_kind
    return next((value for name, value in table.items() if name in kind), None)


def throughput(config: TrainConfig, seconds_per_step: float, devices: int):
    """(tokens/s, MFU): MFU is the FLOP/s of the model (flops_per_token: 6N + 12LdT, PaLM) over
    the peak of the devices the step runs on, None where the peak is unknown."""
    tokens_per_s = config.tokens_per_step / seconds_per_step
    peak = this_device(PEAK_FLOPS)
    mfu = tokens_per_s * flops_per_token(config.model) / (peak * devices) if peak else None
    return tokens_per_s, mfu


# ---------------------------------------------------------------------------------------------
# The loop


def check_finite(pending: list, last_good: int | None) -> list[tuple[int, dict]]:
    """Reads the metrics held on device (the loop's only host sync); stops on NaN/inf, and under
    float16 when its steps keep overflowing (a skipped step is no NaN: its grads were dropped)."""
    steps = [step for step, _ in pending]
    rows = list(zip(steps, jax.device_get([metrics for _, metrics in pending])))  # one transfer
    kept = (f"the last good checkpoint (step {last_good}) is kept" if last_good
            else "no checkpoint was written")
    for step, metrics in rows:
        if "loss_scale" in metrics and float(metrics["loss_scale"]) < 1:
            raise UserError(f"float16 overflowed at every step up to step {step + 1}: the loss "
                            f"scale fell to {float(metrics['loss_scale']):g} (below 1) after "
                            f"{int(metrics['skipped_steps'])} skipped steps; {kept}: use --model."
                            "compute_dtype=bfloat16 (or float32), or lower --learning_rate")
        if metrics.get("skipped", False):
            continue
        for name in ("loss", "grad_norm"):
            if math.isfinite(float(metrics[name])):
                continue
            raise UserError(f"{name.replace('_', ' ')} is {float(metrics[name])} at step {step + 1}; "
                            f"{kept}: lower --learning_rate or raise --warmup_steps")
    pending.clear()
    return rows


@eqx.filter_jit  # one compiled program: run eagerly, tree_norm compiles five small ones per leaf
def weights_norm(model) -> jax.Array:
    return optax.tree_utils.tree_norm(eqx.filter(model, eqx.is_array))


def health_problem(losses: dict, model, last_grad_norm: float | None) -> str | None:
    """Why the state just evaluated must not be saved, or None: a loss or the weights' norm that
    is not finite, or a collapsed model (a zero gradient: it can never learn again, and it
    guesses uniformly)."""
    for split, loss in losses.items():
        if not math.isfinite(loss):
            return f"{split} loss is {loss}"
    norm = float(jax.device_get(weights_norm(model)))
    if not math.isfinite(norm):
        return f"the weights' norm is {norm}"
    if last_grad_norm is not None and last_grad_norm < 1e-8:
        return (f"the model collapsed: grad norm {last_grad_norm:.1e} (it can no longer learn), val "
                f"loss {losses['val']:.4f} against uniform guessing's ln(vocab_size) = "
                f"{math.log(model.config.vocab_size):.4f}")
    return None


def open_data(config: TrainConfig, meta: dict, mesh):
    """(train batches, the two eval splits' batches, to_global) over the prepared dataset."""
    if config.model.vocab_size < meta["vocab_size"]:
        raise UserError(f"model.vocab_size={config.model.vocab_size} is smaller than the data's "
                        f"vocabulary ({meta['vocab_size']}): raise --model.vocab_size")
    if config.init_from and meta["tokenizer"] != "gpt2":
        raise UserError(f"init_from={config.init_from} needs data in GPT-2's BPE, and "
                        f"{config.data_dir} is tokenized '{meta['tokenizer']}': prepare it with "
                        "--tokenizer gpt2")
    if config.hellaswag:  # read now: a bad file is refused before anything is written
        if meta["tokenizer"] != "gpt2":
            raise UserError(f"hellaswag={config.hellaswag} is scored in GPT-2's BPE, and "
                            f"{config.data_dir} is tokenized '{meta['tokenizer']}': drop --hellaswag")
        evaluation.read_hellaswag(config.hellaswag, config.model.block_size)

    def sampler(split, seed, grad_accum):
        if meta[f"{split}_tokens"] == 0:
            raise UserError(f"the {split} split of {config.data_dir} is empty: prepare the dataset "
                            "from more text")
        tokens = data.open_split(config.data_dir, split, meta)
        return data.BatchSampler(tokens, config.model.block_size, config.batch_size, grad_accum,
                                 seed, jax.process_index(), jax.process_count(),
                                 example_length=meta.get("example_length"),
                                 loss_mask=meta.get("loss_mask"), vocab_size=meta["vocab_size"])

    train_batches = sampler("train", config.seed, config.grad_accum)
    eval_batches = {"train": sampler("train", config.seed + 1, 1),
                    "val": sampler("val", config.seed + 2, 1)}
    sharding = batch_sharding(mesh)

    def to_global(local):  # this process's rows -> one array over all devices of all hosts
        global_shape = (local.shape[0], config.batch_size, local.shape[2])
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return train_batches, eval_batches, to_global


def create_or_restore_state(config: TrainConfig, abstract, manager, rundir: Path, train_batches):
    """(params, opt_state, dropout key data, step, notes): restored from the newest intact
    checkpoint (which also moves train_batches on to its step), else initialised (or GPT-2's,
    with init_from). notes name the checkpoints set aside as damaged on the way."""
    abstract_params, abstract_opt, static, optimizer = abstract
    step, notes = None, []
    if manager is not None:
        step, params, opt_state, run_state, notes = checkpoints.restore_newest_intact(
            manager, rundir, abstract_params, abstract_opt)
    if step is None:
        params, opt_state = init_state(config, abstract_params, abstract_opt, optimizer)
        step, key_data = 0, np.asarray(jr.key_data(jr.key(config.seed)))
    else:
        train_batches.load_state_dict(run_state["sampler"])
        key_data = run_state["key"]
    return params, opt_state, key_data, step, notes


@contextlib.contextmanager
def run_outputs(config: TrainConfig, rundir: Path, meta: dict, data_files: dict, start: int,
                changes: dict):
    """(log, scalar, bar), after config.json is written (with this resume's changes in its
    history): log(line) prints a line and appends it to log.txt; scalar(name, value, step) writes
    a TensorBoard scalar; bar is the tqdm progress bar (off when stdout is no terminal). Only
    process 0 writes. With the bar on, per-step lines go to log.txt only (the bar shows them) and
    other lines are printed above it; log.txt never receives the bar's redraws."""
    if jax.process_index() != 0:
        yield (lambda line, step_line=False: None), (lambda name, value, step: None), tqdm(disable=True)
        return
    checkpoints.write_run_config(rundir, config, meta, data_files, start, changes)
    writer = summary_writer(rundir)
    writer.add_text("config", "```\n" + (rundir / "config.json").read_text() + "```")
    bar = tqdm(total=config.max_steps, unit="step", file=sys.stdout, **bar_width(),
               disable=not sys.stdout.isatty(), desc="compiling...")
    with open(rundir / "log.txt", "a") as log_file, writer, bar:

        def log(line: str, step_line: bool = False):
            log_file.write(line + "\n")
            log_file.flush()
            try:
                if bar.disable:
                    print(line, flush=True)
                elif not step_line:
                    bar.write(line, file=sys.stdout)
            except OSError:  # the terminal is gone (SIGHUP): log.txt still has every line
                pass

        yield log, writer.add_scalar, bar


def summary_writer(rundir: Path):
    """tensorboardX's SummaryWriter, imported here (only process 0 writes events) and without
    torch: tensorboardX imports torch whenever it is installed, only to recognise torch tensors,
    which we never log; that import alone took ~1.5 s of every start (BENCHMARKS.md "Startup")."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter(str(rundir))


def evaluate_tasks(model, config: TrainConfig, meta: dict, step: int, log, scalar) -> None:
    """What the run is asked to score besides its loss: exact match of greedy completions (the
    dataset's completion_eval, meta.json) and HellaSwag (config.hellaswag); logged, and written
    to TensorBoard under eval/."""
    if "completion_eval" in meta:
        match = evaluation.exact_match(model, meta, config.data_dir, "val")
        log(f"step {step} | exact match on val: {100 * match['accuracy']:.2f}% ({match['correct']:,} "
            f"of {match['total']:,} examples, greedy)")
        scalar("eval/exact_match", match["accuracy"], step)
    if config.hellaswag:
        items = evaluation.read_hellaswag(config.hellaswag, config.model.block_size)  # read once
        # batch_size // 4 items of 4 endings: no more rows than a training micro-batch
        scores = evaluation.hellaswag_scores(model, items, max(1, config.batch_size // evaluation.ENDINGS),
                                             vocab_limit=meta["vocab_size"])
        log(f"step {step} | hellaswag: acc {scores['acc']:.4f} | acc_norm {scores['acc_norm']:.4f} "
            f"({scores['items']:,} items)")
        scalar("eval/hellaswag_acc", scores["acc"], step)
        scalar("eval/hellaswag_acc_norm", scores["acc_norm"], step)


def start_notes(config: TrainConfig, rundir: Path, meta: dict, set_aside: list, damaged: list,
                start: int, picked: str | None, vocab_from_data: bool, changes: dict) -> list[str]:
    """What a start found and decided, each a line of the log: checkpoints set aside, the dtype
    "auto" picked, the vocabulary read from the data, the settings a resume changed, a run that
    ends inside its warmup."""
    notes = []
    if set_aside:
        notes.append(f"incomplete checkpoints (a crash mid-save) moved to "
                     f"{rundir / 'incomplete_checkpoints'}: step directories "
                     f"{', '.join(set_aside)}")
    notes += damaged
    if damaged:
        notes.append(f"resuming from the newest intact checkpoint, step {start}")
    if picked:
        notes.append(picked)
    if vocab_from_data:
        notes.append(f"model.vocab_size={config.model.vocab_size}: the data's (from "
                     f"{Path(config.data_dir) / 'meta.json'}, {meta['tokenizer']} tokens)")
    if changes:
        notes.append("resumed with " + ", ".join(f"{name} {old!r} -> {new!r}"
                                                 for name, (old, new) in changes.items()))
    if config.warmup_steps >= config.max_steps:  # a short try run: never refused for it
        notes.append(f"warmup_steps={config.warmup_steps} >= max_steps={config.max_steps}: the run "
                     f"ends inside the warmup, its last step at lr "
                     f"{float(jax.jit(lr_schedule(config))(config.max_steps - 1)):.2e} of the peak "
                     f"{config.learning_rate:.2e}")
    return notes


def starting_line(config: TrainConfig, rundir: Path, model, mesh, start: int) -> str:
    processes = f" in {jax.process_count()} processes" * (jax.process_count() > 1)
    return (f"{'resuming at' if start else 'starting'} step {start}/{config.max_steps} | "
            f"{num_params(model, non_embedding=True) / 1e6:.2f}M non-embedding params | mesh "
            f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices"
            f"{processes} | {config.tokens_per_step:,} tokens/step | rundir {rundir}")


def step_line(step: int, last: dict, seconds: float, tokens_per_s: float, mfu) -> str:
    """The log line of a log_interval: the last step's metrics, the speed since the last line."""
    scaling = (f" | loss scale {last['loss_scale']:,.0f} | skipped {last['skipped_steps']:,.0f}"
               if "loss_scale" in last else "")  # float16's loss scaling
    return (f"step {step} | loss {last['loss']:.4f} | lr {last['lr']:.2e} | grad norm "
            f"{last['grad_norm']:.3f} | {seconds * 1e3:.1f} ms/step | {tokens_per_s:,.0f} tok/s | "
            f"MFU {f'{100 * mfu:.1f}%' if mfu else 'n/a'}{scaling}")


def write_step_scalars(scalar, rows: list[tuple[int, dict]]) -> None:
    for step, row in rows:
        # a skipped float16 step has no gradient norm, only a count and a new scale
        skipped = row.get("skipped", False)
        for name in ("loss", "lr") + ("grad_norm",) * (not skipped):
            scalar(f"train/{name}", float(row[name]), step + 1)
        for name in ("loss_scale", "skipped_steps"):
            if name in row:
                scalar(f"train/{name}", float(row[name]), step + 1)


def check_data_unchanged(config: TrainConfig, data_files: dict, step: int, last_saved, rundir):
    """Refuses to go on (and to save) when the data's files changed under the running job."""
    if problem := data.changed_since(config.data_dir, data_files):
        raise UserError(f"{problem} under the running job (noticed at step {step}; the last "
                        f"checkpoint, step {last_saved}, was saved before): restore it, then "
                        f"rerun with --rundir={rundir}")


def reached_line(step: int, val: float, config: TrainConfig, seconds: float,
                 compile_seconds: float, evaluations: int, eval_seconds: float) -> str:
    """The last line of a run that reached target_val_loss: its training time, what is not in it."""
    counted = "1 evaluation's" if evaluations == 1 else f"{evaluations} evaluations'"
    return (f"step {step} | reached val {val:.4f} <= target_val_loss={config.target_val_loss} "
            f"after {seconds:.1f}s of training (the first step's {compile_seconds:.1f}s with "
            f"compilation and {counted} {eval_seconds:.1f}s not counted); stopping")


def stopped_line(how: str, step: int, rundir: Path, manager) -> str:
    """The last line of a run stopped by a signal, once its checkpoint is on disk."""
    if manager is None:
        return f"{how} at step {step} (--debug: no checkpoints)"
    checkpoints.seal(manager)  # on disk, with its checksums, before the line says so
    return (f"{how} at step {step}: checkpoint saved (on disk); rerun with --rundir={rundir} to "
            "resume")


def train(config: TrainConfig, rundir, *, debug: bool = False) -> GPT:
    """Trains (or resumes) the run in rundir; returns the final model. debug: a profile of a few
    steps, and no checkpoints."""
    rundir = Path(rundir)
    # Everything that can refuse the run does so before anything is written.
    check_attention(config)
    meta = data.load_meta(config.data_dir)
    vocab_from_data = not config.model.vocab_size
    config = with_data_vocab(config, meta)
    model_config, picked = with_picked_dtype(config.model, jax.devices()[0])  # "auto" resolved
    config = dataclasses.replace(config, model=model_config)  # config.json records the pick
    mesh = make_mesh(config)
    train_batches, eval_batches, to_global = open_data(config, meta, mesh)
    data_files = data.file_stamps(config.data_dir)  # what the run reads, as it is now
    changes = checkpoints.check_rundir(config, rundir, meta, data_files)
    abstract = abstract_state(config, mesh)
    memory.check_state_fits(config, *abstract[:2])
    # From here Ctrl-C, SIGTERM and SIGHUP are noted, never raised mid-step or mid-save; a Ctrl-C
    # before the first step is done leaves the run directory as it was (as_found_unless_trained).
    with checkpoints.stop_signals() as stop_requested, \
            checkpoints.as_found_unless_trained(rundir) as trained, contextlib.ExitStack() as stack:
        stack.enter_context(checkpoints.rundir_lock(rundir))
        stack.enter_context(checkpoints.disk_full_is_user_error(rundir))
        manager, set_aside = None, []
        if not debug:
            manager, set_aside = checkpoints.open_checkpoints(rundir, config.keep_checkpoints)
            stack.callback(manager.close)
            stack.callback(checkpoints.seal, manager)  # first: the last save on disk, checksummed
        stack.enter_context(memory.out_of_memory_while_training(config, rundir))
        abstract_params, abstract_opt, static, optimizer = abstract
        train_step = make_train_step(config, optimizer, abstract_params, abstract_opt, static)
        compiled_step = stack.enter_context(compiling_ahead(config, train_step, abstract, mesh, manager))
        params, opt_state, key_data, start, damaged = create_or_restore_state(
            config, abstract, manager, rundir, train_batches)
        if start >= config.max_steps:  # a finished run, started again: nothing to write
            if jax.process_index() == 0:
                print(f"nothing to do: {rundir} is at step {start} of max_steps={config.max_steps} "
                      "(raise --max_steps to train on)", flush=True)
            return eqx.combine(params, static)
        if stop_requested(start, manager) == "SIGINT":  # Ctrl-C while restoring: nothing to keep
            raise KeyboardInterrupt
        log, scalar, bar = stack.enter_context(run_outputs(config, rundir, meta, data_files, start,
                                                                  changes))
        for line in start_notes(config, rundir, meta, set_aside, damaged, start, picked,
                                vocab_from_data, changes):
            log(line)
        log(starting_line(config, rundir, params, mesh, start))
        batches = stack.enter_context(contextlib.closing(train_batches.prefetch()))
        step, last_saved, pending = start, (start or None), []  # pending: metrics still on device
        last_grad_norm = None  # of the last step read back, for the health check before a save
        # ms/step counts from step_timer over the steps since timed_from: compilation, profiling
        # and evaluations are not step time (nor are they training time to target_val_loss)
        step_timer, timed_from = time.perf_counter(), start
        run_clock, compile_seconds, eval_seconds, evaluations = time.perf_counter(), 0.0, 0.0, 0
        profiling = False

        def save(val_loss=None):
            checkpoints.save_checkpoint(manager, step, params, opt_state,
                                        train_batches.state_dict(), key_data, val_loss)

        def flush():
            """Reads the pending metrics (one sync), stops on NaN, writes each step's scalars."""
            nonlocal last_grad_norm
            rows = check_finite(pending, last_saved)
            write_step_scalars(scalar, rows)
            if applied := [row for _, row in rows if not row.get("skipped", False)]:
                last_grad_norm = float(applied[-1]["grad_norm"])
            return rows

        def refuse_to_save(problem: str):
            kept = (f"the last good checkpoint, step {last_saved}, is kept" if last_saved
                    else "no checkpoint was written")
            raise UserError(f"{problem} at step {step}: not saved; {kept}: lower --learning_rate "
                            "(or --weight_decay), or raise --warmup_steps")

        bar.update(start)
        while step < config.max_steps:
            # step: one optimizer step; its metrics stay on device until the next log line
            tokens, targets = map(to_global, next(batches))
            args = (params, opt_state, tokens, targets, np.int32(step), key_data)
            if step == start:  # refused here if the compiled step cannot fit
                memory.check_step_fits(config, compiled_step.result())
            params, opt_state, metrics = train_step(*args)
            pending.append((step, metrics))
            step += 1
            bar.update(1)  # host-side only: the bar reads no metric here
            if step == start + 1:  # the first step compiles: not step time, nor profiled
                jax.block_until_ready(metrics)
                if stop_requested(step, manager) == "SIGINT":  # before any step was done
                    raise KeyboardInterrupt
                trained()  # from here a Ctrl-C saves the work instead of undoing the start
                compile_seconds = time.perf_counter() - step_timer
                log(f"step {step}: compiled and ran in {compile_seconds:.1f}s")
                bar.set_description("training")
                if debug:
                    jax.profiler.start_trace(str(rundir / "profile"))
                    profiling = True  # and a run cut short (a target, a signal) still ends it:
                    stack.callback(lambda: profiling and jax.profiler.stop_trace())
                step_timer, timed_from = time.perf_counter(), step
            if profiling and step >= min(start + 1 + config.profile_steps, config.max_steps):
                jax.block_until_ready(params)
                jax.profiler.stop_trace()
                profiling = False
                log(f"profile of steps {start + 2}-{step} written to {rundir / 'profile'}")
                step_timer, timed_from = time.perf_counter(), step

            # log: every log_interval steps, one host sync reads the metrics since the last
            if step % config.log_interval == 0 or step == config.max_steps:
                rows = flush()
                if step > timed_from and rows:
                    seconds = (time.perf_counter() - step_timer) / (step - timed_from)
                    tokens_per_s, mfu = throughput(config, seconds, mesh.size)
                    last = {name: float(value) for name, value in rows[-1][1].items()}
                    log(step_line(step, last, seconds, tokens_per_s, mfu), step_line=True)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                    scalar("perf/ms_per_step", seconds * 1e3, step)
                    scalar("perf/tokens_per_s", tokens_per_s, step)
                    if mfu:
                        scalar("perf/mfu", mfu, step)
                step_timer, timed_from = time.perf_counter(), step

            # evaluate and save: every eval_interval steps, and after the last; a state that is
            # not finite, or has collapsed, is never saved (it would rotate good ones away)
            if step % config.eval_interval == 0 or step == config.max_steps:
                flush()
                eval_start = time.perf_counter()
                check_data_unchanged(config, data_files, step, last_saved, rundir)
                model = eqx.combine(params, static)
                losses = evaluate(model, eval_batches, config, to_global, show=not bar.disable)
                log(f"step {step} | eval: train {losses['train']:.4f} | val {losses['val']:.4f}")
                scalar("eval/train_loss", losses["train"], step)
                scalar("eval/val_loss", losses["val"], step)
                if problem := health_problem(losses, model, last_grad_norm):
                    refuse_to_save(problem)
                if manager is not None:
                    save(val_loss=losses["val"])
                    last_saved = step
                evaluate_tasks(model, config, meta, step, log, scalar)
                step_timer += time.perf_counter() - eval_start
                eval_seconds += time.perf_counter() - eval_start
                evaluations += 1
                if losses["val"] <= config.target_val_loss:
                    seconds = time.perf_counter() - run_clock - compile_seconds - eval_seconds
                    log(reached_line(step, losses["val"], config, seconds, compile_seconds,
                                     evaluations, eval_seconds))
                    scalar("eval/seconds_to_target", seconds, step)
                    break

            # stop: SIGTERM (a preemption) or SIGHUP (a closed terminal) saves the step just
            # finished and exits 0, so a restart resumes right here; Ctrl-C saves it, exits 130
            stop = stop_requested(step, manager) if step < config.max_steps else None
            if stop:
                how = "interrupted" if stop == "SIGINT" else f"stopped by {stop}"
                if manager is not None and step != last_saved:  # else the evaluation just saved it
                    flush()
                    norm = float(jax.device_get(weights_norm(params)))
                    if not math.isfinite(norm):
                        refuse_to_save(f"{how}: the weights' norm is {norm}")
                    save()
                log(stopped_line(how, step, rundir, manager))
                if stop == "SIGINT":
                    raise KeyboardInterrupt
                break
    return eqx.combine(params, static)
