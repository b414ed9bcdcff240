"""A run directory, every file of it: what it holds, what a resume may change, its checkpoints,
and the trained model it gives to sample.py, eval.py and export.py.

    rundir/config.json      the resolved config, the code's commit, the data's hashes, the
                            settings each resume changed (write_run_config, read_run_config)
    rundir/checkpoints/     one orbax step directory per checkpoint: params, opt_state and
                            run_state (the step, the batch sampler's position, the dropout key)
    rundir/train.lock       held while a training runs there (rundir_lock)

A checkpoint is written whole or not at all (orbax renames a step's directory once complete);
after a crash, a half-written one is set aside, never deleted. A full disk, a damaged step or a
checkpoint of other settings is one UserError line. train.py saves and restores through this
module, and stops to save one when the machine is about to go away (preemption_notice);
sample.py, eval.py and export.py pick a checkpoint with choose_step and load it with load_model,
without the training code.
"""

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

import data
from cli import UserError
from config import TrainConfig
from model import GPT, GPTConfig
from sharding import abstract_model, make_mesh

# Orbax logs through absl, also for files it cannot parse; those failures reach the user as one
# UserError line (restore_checkpoint), so its own log lines would only repeat them.
logging.getLogger("absl").setLevel(logging.CRITICAL)


def git_commit() -> str:
    """The code's commit, recorded in config.json."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json_atomic(path: Path, obj) -> None:
    """Written to a temporary file and renamed: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# config.json: what the run is, and what a resume may change


def write_run_config(rundir: Path, config: TrainConfig, meta: dict, start: int, changes: dict):
    """config.json: the resolved config, the code's commit, the hashes of the data it trains on,
    and the history of resumes that changed settings ({step, time, changes}), this one's added."""
    path = rundir / "config.json"
    history = json.loads(path.read_text()).get("history", []) if path.exists() else []
    if changes:
        history.append({"step": start, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "changes": {name: list(values) for name, values in changes.items()}})
    rundir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {
        "config": dataclasses.asdict(config), "git_commit": git_commit(),
        "data": {"dir": config.data_dir, "train_sha256": meta.get("train_sha256"),
                 "val_sha256": meta.get("val_sha256")},
        "history": history,
    })


def read_run_config(rundir: Path) -> TrainConfig:
    """The resolved config a run directory's config.json holds."""
    path = Path(rundir) / "config.json"
    if not path.exists():
        raise UserError(f"{rundir} is not a run directory (no config.json): check --rundir")
    try:
        fields = json.loads(path.read_text())["config"]
        return TrainConfig(**{**fields, "model": GPTConfig(**fields["model"])})
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid eqxgpt config ({e}): check --rundir") from None


# What a resume may change. Any setting may, and the new value takes effect (logged, and kept in
# config.json's history), except those the checkpoint fixes, where a new value could not:
REFUSED_ON_RESUME = {
    "seed": "batches and dropout keep the checkpoint's seed",
    "init_from": "the weights come from the checkpoint",
    "optimizer": "the checkpoint holds the state of the optimizer it was trained with",
}
# ... and the model, except how the same function is computed (not what it computes).
MODEL_MAY_CHANGE_ON_RESUME = ("attention", "remat", "unroll_layers")


def check_rundir(config: TrainConfig, rundir: Path, meta: dict | None = None) -> dict:
    """Refuses a run directory that config cannot run in, before anything is written into it:
    a file, another model, other data (meta), a setting a resume cannot change. Returns the
    settings a resume changes, {name: (old, new)}."""
    if rundir.exists() and not rundir.is_dir():
        raise UserError(f"--rundir={rundir} is a file, not a run directory: pass a directory")
    checkpoint_dir = rundir / "checkpoints"
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir} is a file where the run's checkpoints belong: move it away")
    if not (rundir / "config.json").exists():
        if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
            raise UserError(f"{rundir} has checkpoints but no config.json: use a new --rundir")
        return {}
    previous = read_run_config(rundir)
    changed = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in MODEL_MAY_CHANGE_ON_RESUME
               and getattr(previous.model, f.name) != getattr(config.model, f.name)]
    if changed:
        raise UserError(f"{rundir} holds a run of a different model (model.{', model.'.join(changed)} "
                        "differ): use a new --rundir or the original config")
    recorded = json.loads((rundir / "config.json").read_text()).get("data")
    for split in data.SPLITS if meta is not None and isinstance(recorded, dict) else ():
        was, now = recorded.get(f"{split}_sha256"), meta.get(f"{split}_sha256")
        if was and now and was != now:
            raise UserError(f"{config.data_dir} holds other data than the run in {rundir} was "
                            f"trained on ({split}.bin's sha256 differs from its config.json): the "
                            "token ids would mean other tokens; start a new --rundir")
    old = {**dataclasses.asdict(previous), **flat_model(previous)}
    new = {**dataclasses.asdict(config), **flat_model(config)}
    changes = {name: (old.get(name), value) for name, value in new.items()
               if name != "model" and old.get(name) != value}
    for name, why in REFUSED_ON_RESUME.items():
        if name in changes:
            raise UserError(f"{rundir} was trained with {name}={changes[name][0]!r}, and "
                            f"{name}={changes[name][1]!r} cannot take effect on resume ({why}): "
                            f"keep {name}, or start a new --rundir")
    return changes


def flat_model(config: TrainConfig) -> dict:
    return {f"model.{name}": value for name, value in dataclasses.asdict(config.model).items()}


# ---------------------------------------------------------------------------------------------
# The lock, and the checkpoints


@contextlib.contextmanager
def rundir_lock(rundir: Path):
    """Holds rundir/train.lock while training there, so a second training in it is refused. The
    kernel releases the lock when its process ends, however it ends: a lock file left by a dead
    process is free. While held it names its holder; a clean exit empties it again, so a run
    that ends (or is refused) leaves the run directory's files as they were."""
    if jax.process_index() != 0:  # process 0 holds it for the whole run
        yield
        return
    path = rundir / "train.lock"
    try:
        rundir.mkdir(parents=True, exist_ok=True)
        lock_file = open(path, "a+")
    except OSError as e:
        raise UserError(f"cannot write to {rundir} ({e.strerror or e}): pass a --rundir you can "
                        "write to, or copy this one to such a place") from None
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            raise UserError(f"{rundir} is in use by another training ({holder}): wait for it to "
                            "end or stop it, or pass another --rundir") from None
        lock_file.truncate(0)
        lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock_file.flush()
        try:
            yield
        finally:
            lock_file.truncate(0)
            fcntl.flock(lock_file, fcntl.LOCK_UN)


COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step's directory once it is whole


def is_disk_full(error: BaseException | None) -> bool:
    """Whether error, or one it arose from, says the disk is full. Orbax's array writes (through
    tensorstore) report it as a ValueError that quotes the OS's message."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_full_is_user_error(rundir: Path):
    """A full disk, wherever in the run it shows (a checkpoint, log.txt, events), is one line
    naming the last complete checkpoint, which survives it (orbax renames a step when whole)."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        steps = sorted(int(p.name) for p in (rundir / "checkpoints").glob("*")
                       if p.name.isdigit() and (p / COMMIT_MARKER).exists())
        kept = f"the last good checkpoint is step {steps[-1]}" if steps else "no checkpoint was written"
        raise UserError(f"the disk holding {rundir} is full: {kept}; free some space, then rerun "
                        f"with --rundir={rundir} to resume") from None


def set_aside_incomplete_checkpoints(rundir: Path) -> list[str]:
    """Moves step directories that a crash left unfinished (orbax's temporary directories, or a
    step without orbax's commit marker) into rundir/incomplete_checkpoints/, so a restart resumes
    from the newest complete checkpoint and can save that step again. Nothing is deleted."""
    directory = rundir / "checkpoints"
    if not directory.is_dir():
        return []
    incomplete = [p for p in directory.iterdir() if p.is_dir() and (
        ocp.path.step.is_tmp_checkpoint(p) or (p.name.isdigit() and not (p / COMMIT_MARKER).exists()))]
    aside = rundir / "incomplete_checkpoints"
    for path in incomplete:
        aside.mkdir(exist_ok=True)
        os.replace(path, aside / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return sorted(p.name for p in incomplete)


def checkpoint_manager(rundir: Path, keep_last: int | None = None) -> ocp.CheckpointManager:
    """The run's checkpoints; keep_last=None opens them read-only (sampling, inspection)."""
    options = {"create": False, "read_only": True}
    if keep_last is not None:
        policies = ocp.checkpoint_managers
        keep = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep_last),
            # BestN keeps the last n after sorting; reverse=True sorts descending: the lowest loss
            policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = {"preservation_policy": keep, "enable_async_checkpointing": True}
    # best_fn makes orbax store the metrics passed to save(), which BestN and "best" read back.
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["val_loss"], best_mode="min", **options)
    directory = (rundir / "checkpoints").absolute()
    try:
        return ocp.CheckpointManager(directory, options=options)
    except Exception as e:  # it reads every step's metadata: a damaged one fails here
        raise UserError(f"the checkpoints in {directory} cannot be read ({type(e).__name__}: "
                        f"{str(e)[:200]}): move the damaged step's directory away") from None


def save_checkpoint(manager, step: int, params, opt_state, sampler_state: dict, key_data,
                    val_loss: float | None = None):
    """Saves the training state at step: the parameters and optimizer state, and as run_state the
    step, the batch sampler's position, the dropout key and the val loss (if evaluated)."""
    run_state = {"step": step, "sampler": sampler_state, "key": np.asarray(key_data).tolist(),
                 "val_loss": val_loss}
    # A save that runs out of space fails inside orbax's threads, which print a traceback per
    # write still pending: refuse before writing when the free space cannot hold the checkpoint.
    manager.wait_until_finished()  # the last save is on disk, so the free space is exact
    needed = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves((params, opt_state)))
    free = shutil.disk_usage(manager.directory).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: checkpoint {step} needs "
                      f"{needed:,} bytes, {free:,} are free")
    # Separate items, so sampling can restore the parameters without the optimizer state.
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        run_state=ocp.args.JsonSave(run_state),
    )
    # Orbax writes into a temporary directory and renames it when complete: a crash mid-save
    # leaves the previous checkpoints as they were and no half-written one that loads.
    manager.save(step, args=args, metrics=None if val_loss is None else {"val_loss": val_loss})


def restore_checkpoint(manager, step, abstract_params, abstract_opt=None):
    """(params, opt_state or None, run_state) at step, each array placed on its own shard.
    run_state: {"sampler": the batch sampler's state, "key": the dropout key's data (uint32)}."""
    items = {"params": ocp.args.StandardRestore(abstract_params),
             "run_state": ocp.args.JsonRestore()}
    if abstract_opt is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many kinds: a healthy checkpoint of another layout, or
        # a damaged one. Only the second may be deleted, so tell them apart by the saved layout.
        abstract = {"params": abstract_params, "opt_state": abstract_opt}
        for item, what in (("opt_state", "optimizer state"), ("params", "parameters")):
            if abstract[item] is not None:
                check_saved_layout(manager, step, item, what, abstract[item])
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"checkpoint {step} in {manager.directory} cannot be read, it is damaged "
                        f"({reason}): delete that step's directory to fall back to an earlier one"
                        ) from None
    opt_state = restored.opt_state if abstract_opt is not None else None
    run_state = {"sampler": restored.run_state["sampler"],
                 "key": np.asarray(restored.run_state["key"], np.uint32)}
    return restored.params, opt_state, run_state


def check_saved_layout(manager, step, item: str, what: str, abstract) -> None:
    """A UserError naming what differs when checkpoint `step` saved `item` with other array paths
    or shapes than `abstract`: a healthy checkpoint of other settings, never to be deleted."""
    def layout(tree):
        return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    try:
        directory = manager.directory / str(step) / item
        saved = layout(ocp.StandardCheckpointHandler().metadata(directory).tree)
    except Exception:  # its layout is unreadable too: damaged, not different
        return
    expected = layout(abstract)
    differ = sorted(p for p in saved.keys() | expected.keys() if saved.get(p) != expected.get(p))
    if not differ:
        return
    shape = lambda layout, path: str(layout[path]) if path in layout else "absent"  # noqa: E731
    examples = "; ".join(f"{p}: {shape(saved, p)} saved, {shape(expected, p)} now" for p in differ[:2])
    raise UserError(f"checkpoint {step} in {manager.directory} holds another {what} than this run "
                    f"makes ({len(differ)} arrays differ, e.g. {examples}): the optimizer, its "
                    "settings or the code changed since it was saved. Resume with the run's own "
                    f"settings (--rundir={manager.directory.parent}, no overrides) or start a new "
                    "--rundir; nothing on disk was changed")


def open_checkpoints(rundir: Path, keep_last: int) -> tuple[ocp.CheckpointManager, list]:
    """The run's checkpoint manager for training, after half-written checkpoints are set aside
    (by process 0; the others wait for it). Returns it and the step directories set aside."""
    set_aside = set_aside_incomplete_checkpoints(rundir) if jax.process_index() == 0 else []
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("incomplete checkpoints set aside")
    return checkpoint_manager(rundir, keep_last), set_aside


@contextlib.contextmanager
def preemption_notice(manager):
    """Yields stop_requested(step): "SIGTERM" or "SIGINT" once the run should save and stop.

    SIGTERM is what SLURM, Kubernetes and spot machines send before they take a machine. With
    one process, a handler notes it and the loop stops after the step in flight. With several,
    JAX's preemption service (started by jax.distributed) receives it, and orbax's
    reached_preemption(step) turns True on every host at the same step, so all save that step.
    """
    received, interrupted = threading.Event(), threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    own_handler = jax.process_count() == 1 and main_thread
    if own_handler:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
    if main_thread:
        # Ctrl-C is noted too, not raised inside a step whose inputs are donated (they could not
        # be saved); a second Ctrl-C stops at once.
        def on_ctrl_c(signum, frame):
            interrupted.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous_int = signal.signal(signal.SIGINT, on_ctrl_c)

    def stop_requested(step: int) -> str | None:
        if interrupted.is_set():
            return "SIGINT"
        if received.is_set():
            return "SIGTERM"
        preempted = manager is not None and jax.process_count() > 1 and manager.reached_preemption(step)
        return "SIGTERM" if preempted else None

    try:
        yield stop_requested
    finally:
        if own_handler:
            signal.signal(signal.SIGTERM, previous)
        if main_thread:
            signal.signal(signal.SIGINT, previous_int)


def choose_step(rundir: Path, which: str | int = "auto") -> int:
    """The checkpoint to load, among those on disk: "latest", "best" (lowest val loss), a step
    number, or "auto": the best when any checkpoint has a val loss (nanoGPT keeps only its best),
    else the latest."""
    if not (Path(rundir) / "checkpoints").is_dir():
        raise UserError(f"{rundir} has no checkpoints yet: train first (or check --rundir)")
    manager = checkpoint_manager(Path(rundir))
    steps = manager.all_steps()
    if not steps:
        raise UserError(f"no checkpoints in {manager.directory}: train first")
    scored = [(m["val_loss"], s) for s in steps if (m := manager.metrics(s))]
    which = str(which)
    if which == "auto":
        which = "best" if scored else "latest"
    if which == "latest":
        return max(steps)
    if which == "best":
        if not scored:
            raise UserError("no checkpoint has a val loss yet: use --checkpoint=latest")
        return min(scored)[1]
    if not which.isdigit() or int(which) not in steps:
        raise UserError(f"--checkpoint={which}: use auto, latest, best or one of {sorted(steps)}")
    return int(which)


def load_model(rundir, which: int | str = "latest") -> tuple[TrainConfig, GPT]:
    """The trained model of a run (parameters only, no optimizer state) with its config, on the
    devices present: whatever they are now (a run trained on 8 GPUs samples on 1 CPU), FSDP over
    all of them. which: a step the caller chose with choose_step, or a name choose_step takes."""
    rundir = Path(rundir)
    config = read_run_config(rundir)
    step = which if isinstance(which, int) else choose_step(rundir, which)
    config = dataclasses.replace(config, data_parallel=1, fsdp=-1, batch_size=jax.device_count())
    abstract_params, static = abstract_model(config.model, make_mesh(config), config.fsdp_min_size)
    params, _, _ = restore_checkpoint(checkpoint_manager(rundir), step, abstract_params)
    return config, eqx.combine(params, static)
