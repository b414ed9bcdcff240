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
module, and stops to save one when the machine is about to go away (stop_signals);
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
import sys
import threading
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
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
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_bytes_atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# config.json: what the run is, and what a resume may change


def write_run_config(rundir: Path, config: TrainConfig, meta: dict, data_files: dict, start: int,
                     changes: dict):
    """config.json: the resolved config, the code's commit, what the run trains on (the data's
    hashes and tokenizer, each file's size and modification time as this start read it), and the
    history of resumes that changed settings ({step, time, changes}), this one's added."""
    path = rundir / "config.json"
    history = json.loads(path.read_text()).get("history", []) if path.exists() else []
    if changes:
        history.append({"step": start, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "changes": {name: list(values) for name, values in changes.items()}})
    rundir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {
        "config": dataclasses.asdict(config), "git_commit": git_commit(),
        "data": {"dir": config.data_dir, "train_sha256": meta.get("train_sha256"),
                 "val_sha256": meta.get("val_sha256"), "files": data_files,
                 **{key: meta[key] for key in data.TOKENIZER_KEYS if key in meta}},
        "history": history,
    })


def run_tokenizer(rundir: Path) -> dict | None:
    """What the run's token ids mean (data.tokenizer_of), as config.json recorded it, else as its
    data directory says now (a run from before config.json held it); None when neither can."""
    recorded = json.loads((Path(rundir) / "config.json").read_text()).get("data") or {}
    if "tokenizer" in recorded:
        return data.tokenizer_of(recorded)
    try:
        return data.tokenizer_of(data.load_meta(read_run_config(rundir).data_dir))
    except UserError:
        return None


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
    "loss_scale_init": "the checkpoint carries the loss scale it reached",
}
# ... and the model, except how the same function is computed (not what it computes): its
# precision too, between bfloat16 and float32 (float16's optimizer state adds a loss scale).
MODEL_MAY_CHANGE_ON_RESUME = ("attention", "remat", "unroll_layers", "compute_dtype")


def check_rundir(config: TrainConfig, rundir: Path, meta: dict | None = None,
                 data_files: dict | None = None) -> dict:
    """Refuses a run directory that config cannot run in, before anything is written into it:
    a file, another model, other data (meta, and data_files: a .bin rewritten since the run
    last read it, though meta.json was not), a setting a resume cannot change. Returns the
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
    read_before = recorded.get("files", {}) if isinstance(recorded, dict) else {}
    for split, stamp in (data_files or {}).items():  # cheap: size and time first, the hash if moved
        was, sha256 = read_before.get(split), recorded.get(f"{split}_sha256")
        if was and list(was) != list(stamp) and sha256:
            path = Path(config.data_dir) / f"{split}.bin"
            if data.sha256_file(path) != sha256:
                raise UserError(f"{path} was rewritten since the run in {rundir} last read it (its "
                                "sha256 differs from config.json's, though meta.json did not "
                                "change): restore it, or prepare the data again and start a new "
                                "--rundir")
    if read_before and (problem := data.shards_changed_since(config.data_dir, read_before)):
        raise UserError(f"{rundir} was trained on other data files: {problem} (shards carry no "
                        "hash that could tell the same tokens from others): restore the run's "
                        "files, or start a new --rundir")
    old = {**dataclasses.asdict(previous), **flat_model(previous)}
    new = {**dataclasses.asdict(config), **flat_model(config)}
    changes = {name: (old.get(name), value) for name, value in new.items()
               if name != "model" and old.get(name) != value}
    for name, why in REFUSED_ON_RESUME.items():
        if name in changes:
            raise UserError(f"{rundir} was trained with {name}={changes[name][0]!r}, and "
                            f"{name}={changes[name][1]!r} cannot take effect on resume ({why}): "
                            f"keep {name}, or start a new --rundir")
    was, now = changes.get("model.compute_dtype", (None, None))
    if "float16" in (was, now):
        raise UserError(f"{rundir} was trained with model.compute_dtype={was!r}, and {now!r} "
                        "cannot take effect on resume (only float16's optimizer state carries a "
                        f"loss scale): resume with --model.compute_dtype={was}, or start a new "
                        "--rundir")
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
    seal(manager)  # the last save is on disk and checksummed, so the free space is exact
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


class Damaged(Exception):
    """A checkpoint whose files cannot be what was saved: a checksum that differs, an item orbax
    cannot read although its layout is this run's, a run_state without its fields."""


def drop_reports_of_reads_left_in_flight() -> None:
    """A restore that fails on one array ends orbax's asyncio loop while tensorstore still reads
    others; each such read, when it lands, reports from C++ that its loop is closed: a traceback
    on stderr for every one (~100 for a failed restore of 40 arrays). The failure was raised
    already, so those reports are dropped; any other unraisable exception still reaches the hook.
    Installed before the read: the first reads may land before the failure reaches Python."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loops", False):
        return

    def hook(unraisable):
        if not (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loops = True
    sys.unraisablehook = hook


def restore_checkpoint(manager, step, abstract_params, abstract_opt=None):
    """(params, opt_state or None, run_state) at step, each array placed on its own shard.
    run_state: {"sampler": the batch sampler's state, "key": the dropout key's data (uint32)}.
    Raises Damaged, or a UserError for a healthy checkpoint of another layout."""
    items = {"params": ocp.args.StandardRestore(abstract_params),
             "run_state": ocp.args.JsonRestore()}
    if abstract_opt is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt)
    drop_reports_of_reads_left_in_flight()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many kinds: a healthy checkpoint of another layout, or
        # a damaged one. Only the second is set aside, so tell them apart by the saved layout.
        abstract = {"params": abstract_params, "opt_state": abstract_opt}
        for item, what in (("opt_state", "optimizer state"), ("params", "parameters")):
            if abstract[item] is not None:
                check_saved_layout(manager, step, item, what, abstract[item])
        raise Damaged(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from None
    opt_state = restored.opt_state if abstract_opt is not None else None
    return restored.params, opt_state, read_run_state(restored.run_state)


def read_run_state(saved) -> dict:
    """The run_state a checkpoint saved, checked: the sampler's seed and step, and the key's two
    32-bit words. A field missing or of another type raises Damaged naming it."""
    sampler = saved.get("sampler") if isinstance(saved, dict) else None
    key = saved.get("key") if isinstance(saved, dict) else None
    is_count = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0  # noqa: E731
    if not (isinstance(sampler, dict) and is_count(sampler.get("seed")) and is_count(sampler.get("step"))):
        raise Damaged("its run_state has no batch sampler position (sampler.seed, sampler.step)")
    if not (isinstance(key, list) and len(key) == 2 and all(is_count(k) and k < 2**32 for k in key)):
        raise Damaged("its run_state has no dropout key (two 32-bit words)")
    return {"sampler": sampler, "key": np.asarray(key, np.uint32)}


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
def stop_signals():
    """Yields stop_requested(step, manager): None, or "SIGINT", "SIGTERM" or "SIGHUP" once the run
    should save and stop.

    SIGTERM is what SLURM, Kubernetes and spot machines send before they take a machine, SIGHUP
    what a closed terminal or ssh session sends; Ctrl-C is SIGINT. None of them is raised inside
    the program: a step (whose inputs are donated), a compilation or a save is never cut, and a
    second Ctrl-C says that the save is under way. With several processes, JAX's preemption
    service (started by jax.distributed) receives SIGTERM (SIGHUP is passed on to it as one), and
    orbax's reached_preemption(step) turns True on every host at the same step, so all save it.
    """
    noted = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread
        yield lambda step, manager: None
        return
    own_sigterm = jax.process_count() == 1

    def note(signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGHUP" and not own_sigterm:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service, which syncs hosts
        if noted and name == "SIGINT":
            print("Ctrl-C again: saving the step in flight first, then stopping (kill -9 stops at "
                  "once, without saving)", file=sys.stderr, flush=True)
        noted.append(name)

    caught = (signal.SIGINT, signal.SIGHUP) + ((signal.SIGTERM,) if own_sigterm else ())
    previous = {signum: signal.signal(signum, note) for signum in caught}

    def stop_requested(step: int, manager) -> str | None:
        if noted:
            return "SIGINT" if "SIGINT" in noted else noted[0]
        preempted = manager is not None and jax.process_count() > 1 and manager.reached_preemption(step)
        return "SIGTERM" if preempted else None

    try:
        yield stop_requested
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def as_found_unless_trained(rundir: Path):
    """Yields trained(): call it once a step is done. Until then a Ctrl-C (KeyboardInterrupt) or
    a refusal (UserError: the step cannot fit, the data changed) leaves rundir as it found it: a
    new run directory is removed, an existing one gets back its config.json and log.txt as they
    were and loses the files this start added (process 0)."""
    existed = rundir.exists()
    entries = set(os.listdir(rundir)) if existed else set()
    config_before = (rundir / "config.json").read_bytes() if (rundir / "config.json").exists() else None
    log_size = (rundir / "log.txt").stat().st_size if (rundir / "log.txt").exists() else None
    started = []
    try:
        yield lambda: started.append(True)
    except (KeyboardInterrupt, UserError):
        if not started and jax.process_index() == 0 and rundir.exists():
            # best effort: a refusal for a read-only or full run directory may undo nothing there
            with contextlib.suppress(OSError):
                if not existed:
                    shutil.rmtree(rundir)
                else:
                    for name in set(os.listdir(rundir)) - entries - {"incomplete_checkpoints",
                                                                       "damaged_checkpoints"}:
                        path = rundir / name
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
                    if config_before is not None:
                        write_bytes_atomic(rundir / "config.json", config_before)
                    if log_size is not None:
                        os.truncate(rundir / "log.txt", log_size)
        raise


def candidate_steps(rundir: Path, which: str | int = "auto") -> list[int]:
    """The checkpoints to load, in the order to try them: "latest" (newest first), "best" (lowest
    val loss first), a step number (that one only), or "auto": best when any checkpoint has a val
    loss (nanoGPT keeps only its best), else latest."""
    if not (Path(rundir) / "checkpoints").is_dir():
        raise UserError(f"{rundir} has no checkpoints yet: train first (or check --rundir)")
    manager = checkpoint_manager(Path(rundir))
    steps = manager.all_steps()
    if not steps:
        raise UserError(f"no checkpoints in {manager.directory}: train first")
    scored = sorted((m["val_loss"], s) for s in steps if (m := manager.metrics(s)))
    which = str(which)
    if which == "auto":
        which = "best" if scored else "latest"
    if which == "latest":
        return sorted(steps, reverse=True)
    if which == "best":
        if not scored:
            raise UserError("no checkpoint has a val loss yet: use --checkpoint=latest")
        return [step for _, step in scored]
    if not which.isdigit() or int(which) not in steps:
        raise UserError(f"--checkpoint={which}: use auto, latest, best or one of {sorted(steps)}")
    return [int(which)]


def choose_step(rundir: Path, which: str | int = "auto") -> int:
    """The checkpoint `which` names first (candidate_steps), before any is read."""
    return candidate_steps(rundir, which)[0]


def load_model(rundir, which: int | str = "auto", note=lambda line: None) -> tuple[TrainConfig, GPT, int]:
    """(config, model, step): the trained model of a run (parameters only) from the first intact
    checkpoint `which` names (candidate_steps), on the devices present, FSDP over all of them (a
    run trained on 8 GPUs samples on 1 CPU). A damaged or non-finite checkpoint, or one a running
    training rotates away meanwhile, is skipped and named through note(line); asked for by its
    step number, it is one UserError line."""
    rundir = Path(rundir)
    config = read_run_config(rundir)
    config = dataclasses.replace(config, data_parallel=1, fsdp=-1, batch_size=jax.device_count())
    abstract_params, static = abstract_model(config.model, make_mesh(config), config.fsdp_min_size)
    explicit = isinstance(which, int) or str(which).isdigit()
    skipped = []
    for step in candidate_steps(rundir, which):
        problem = None
        if not (rundir / "checkpoints" / str(step)).is_dir():
            problem = "rotated away by the training running there while this loaded: not damaged"
        problem = problem or verify(rundir / "checkpoints" / str(step), items=("params",))
        if problem is None:
            try:
                params, _, _ = restore_checkpoint(checkpoint_manager(rundir), step, abstract_params)
                problem = None if all_finite(params) else NOT_FINITE
            except Damaged as e:
                problem = f"damaged: {e}"
                if not (rundir / "checkpoints" / str(step)).is_dir():
                    problem = "rotated away by the training running there while this loaded: not damaged"
        if problem is None:
            return config, eqx.combine(params, static), step
        if explicit:
            raise UserError(f"checkpoint {step} in {rundir} cannot be used ({problem}): pass "
                            "another --checkpoint (latest, best or a step number)")
        note(f"checkpoint {step} skipped ({problem})")
        skipped.append(step)
    raise UserError(f"no checkpoint of {rundir} can be used: {', '.join(map(str, skipped))} were "
                    "skipped (above); train again, or see the run's damaged_checkpoints/")


# ---------------------------------------------------------------------------------------------
# Checksums: every checkpoint carries one, every reader checks it


CHECKSUMS = "checksums.json"  # in a step's directory: the sha256 of each of its files
NOT_FINITE = "its weights are not finite: the run had diverged when it was saved"


def file_digests(step_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(step_dir)): data.sha256_file(p) for p in sorted(step_dir.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS}


def seal(manager) -> None:
    """Waits until the last save is on disk, then writes the checksums of every step that has
    none yet (by process 0: orbax has committed a step's files on every host by then)."""
    manager.wait_until_finished()
    if jax.process_index() != 0:
        return
    for step in manager.all_steps():
        step_dir = Path(manager.directory) / str(step)
        if step_dir.is_dir() and not (step_dir / CHECKSUMS).exists():
            write_json_atomic(step_dir / CHECKSUMS, file_digests(step_dir))


def verify(step_dir: Path, items: tuple[str, ...] | None = None) -> str | None:
    """What differs between a step's files and its checksums ("damaged: ..."), or None. items: read
    only those item directories (and the step's own files). A step without checksums (saved before
    they were written, or by a run killed in the instant between the two) has none to check."""
    path = step_dir / CHECKSUMS
    if not path.exists():
        return None
    try:
        expected = json.loads(path.read_text())
        assert isinstance(expected, dict)
    except (OSError, ValueError, AssertionError):
        return f"damaged: its {CHECKSUMS} cannot be read"
    for name, digest in expected.items():
        if items is not None and "/" in name and name.split("/")[0] not in items:
            continue
        file = step_dir / name
        if not file.is_file():
            return f"damaged: {name} is missing"
        if data.sha256_file(file) != digest:
            return f"damaged: {name} does not match its checksum"
    return None


def all_finite(params) -> bool:
    leaves = [a for a in jax.tree.leaves(params) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves))


def set_aside(rundir: Path, step: int, why: str) -> Path:
    """Moves a step's directory into rundir/damaged_checkpoints/ with why.txt beside its files;
    nothing is deleted. Process 0 moves; every process then waits for it."""
    aside = rundir / "damaged_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        aside.parent.mkdir(exist_ok=True)
        os.replace(rundir / "checkpoints" / str(step), aside)
        (aside / "why.txt").write_text(why + "\n")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    return aside


def restore_newest_intact(manager, rundir: Path, abstract_params, abstract_opt):
    """(step, params, opt_state, run_state, notes) from the newest checkpoint whose checksums,
    run state and weights are sound, or step None when there is no checkpoint. Each one that is
    not is set aside (damaged_checkpoints/) and named in notes; when none is left, UserError."""
    notes = []
    for step in sorted(manager.all_steps(), reverse=True):
        problem = verify(Path(manager.directory) / str(step))
        if problem is None:
            try:
                params, opt_state, run_state = restore_checkpoint(manager, step, abstract_params,
                                                                  abstract_opt)
                if all_finite(params):
                    return step, params, opt_state, run_state, notes
                problem = NOT_FINITE
            except Damaged as e:
                problem = f"damaged: {e}"
        aside = set_aside(rundir, step, problem)
        manager.reload()
        notes.append(f"checkpoint {step} set aside to {aside} ({problem})")
    if notes:
        raise UserError(f"no checkpoint of {rundir} is intact: {'; '.join(notes)}; start a new "
                        "--rundir (or move a checkpoint back from damaged_checkpoints/ yourself)")
    return None, None, None, None, notes
