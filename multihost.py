"""One training over several processes (several hosts, or one process per GPU): joining the
cluster, and stopping together when one process dies.

    python launch.py --multihost --rundir=R ...     # every process runs the same command

jax.distributed.initialize finds the coordinator, the number of processes and this process's
index in what the scheduler sets: SLURM's srun (cluster/train.sbatch), Open MPI, an indexed
Kubernetes Job, a Cloud TPU pod slice. Elsewhere launch.py passes them from its flags.

When a process dies, JAX's coordination service notices its missing heartbeats only after
half to all of the heartbeat timeout, then aborts every other process with a C++ stack dump
that names no step to resume from. stop_together makes the others stop first, with one line:
which process, and that restarting all of them resumes from the last checkpoint every process
finished. A process that fails with an error says so, and the others stop at once.
"""

import atexit
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
from jax._src.clusters import ClusterEnv

import checkpoints
from cli import UserError

PREFIX = "eqxgpt/"  # our keys in JAX's coordination service, which lives as long as the launch


def join(coordinator=None, num_processes=None, process_id=None, heartbeat_timeout=100) -> None:
    """jax.distributed.initialize with what was not given detected from the cluster environment;
    a UserError that says what to do when there is no cluster to join."""
    if heartbeat_timeout < 4:
        raise UserError(f"--heartbeat_timeout={heartbeat_timeout}: must be at least 4 seconds")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only clusters
    try:
        coordinator, num_processes, process_id, _ = ClusterEnv.auto_detect_unset_distributed_params(
            coordinator, num_processes, process_id, None, None, None)
        bind = None
        if process_id == 0 and coordinator and num_processes and num_processes > 1:
            serve_coordination(coordinator, num_processes, heartbeat_timeout)
            bind = "[::]:0"  # JAX's own service in this process: idle, on a port nobody uses
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   coordinator_bind_address=bind,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except (ValueError, RuntimeError, KeyError) as e:  # no cluster found, coordinator unreachable
        if "SLURM_JOB_ID" in os.environ and "SLURM_STEP_NODELIST" not in os.environ:
            # sbatch's batch script (or a shell on an allocated node) is one process, in no job
            # step: SLURM has started no other task, and JAX's SLURM detection needs the step's nodes.
            raise UserError("--multihost inside a SLURM job but outside srun (no SLURM_STEP_NODELIST): "
                            "start one task per GPU with `srun python launch.py --multihost ...`, "
                            "as cluster/train.sbatch does") from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--multihost: cannot join a cluster ({reason}): pass --coordinator, "
                        "--num_processes and --process_id, or run under a scheduler JAX detects "
                        "(SLURM's srun, Open MPI, a Kubernetes Job, a Cloud TPU pod)") from None


# JAX's coordination service, which every process's beats and keys go through, in a process of
# its own: in process 0 itself, it would die with it and JAX would abort the others at once.
SERVICE = """
import os, signal, sys, time
for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # it ends when process 0 has ended
    signal.signal(stop, signal.SIG_IGN)
from jax._src.lib import _jax
bind, count, heartbeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
port = format(int(bind.rsplit(":", 1)[1]), "04X")
service = _jax.get_distributed_runtime_service(bind, count, heartbeat_timeout=heartbeat,
                                               shutdown_timeout=300)
print("serving", flush=True)
sys.stdin.read()  # until process 0 ends, however it ends


def connected():  # clients still connected to the port (Linux; elsewhere: wait the whole grace)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            return True
        if any(r.split()[1].endswith(":" + port) and r.split()[3] == "01" for r in rows):
            return True
    return False


deadline = time.monotonic() + heartbeat / 2  # the others notice process 0's silence at a quarter
while connected() and time.monotonic() < deadline:
    time.sleep(0.2)
os._exit(0)
"""


def serve_coordination(coordinator: str, num_processes: int, heartbeat_timeout: int) -> None:
    """Starts the coordination service for the cluster in a child of process 0 that outlives it
    (until the other processes have stopped, naming it), and waits until it listens."""
    port = coordinator.rsplit(":", 1)[1]
    service = subprocess.Popen(
        [sys.executable, "-c", SERVICE, f"[::]:{port}", str(num_processes), str(heartbeat_timeout)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    if service.stdout.readline().strip() != b"serving":
        raise UserError(f"--multihost: cannot serve the coordinator on port {port} (in use?): "
                        "pick a free port in --coordinator")
    atexit.register(service.stdin.close)  # or this process's death closes it: the service's cue


def last_finished_checkpoint(rundir: Path) -> int | None:
    """The newest step that every process finished writing: orbax marks it once all are done."""
    steps = [int(marker.parent.name) for marker in
             (rundir / "checkpoints").glob(f"*/{checkpoints.COMMIT_MARKER}") if marker.parent.name.isdigit()]
    return max(steps, default=None)


def exit_code(error: BaseException) -> int:
    """The code run_cli ends the process with when error escapes main()."""
    if isinstance(error, SystemExit):
        return 0 if error.code is None else error.code if isinstance(error.code, int) else 1
    return {UserError: 2, KeyboardInterrupt: 130}.get(type(error), 1)


def one_line(error: BaseException) -> str:
    """How the other processes quote error: the line run_cli prints for it, or its first line."""
    text = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, UserError):
        return f"error: {text}"
    return "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {text}"


@contextlib.contextmanager
def stop_together(rundir: Path, heartbeat_timeout: int):
    """While the body runs, a thread in every process beats in JAX's key-value store and reads
    the others' beats. When one falls silent for heartbeat_timeout/4 (JAX's own heartbeat aborts
    at the earliest after half of it), or fails with an error, every other process prints one
    line and exits 1. Process 0 leaves last: JAX ends the others the moment it goes.
    An error in a collective waits first for the watcher to name a silent process (a dead peer's
    socket fails it at once); an error that is not one ends the run a silence later, as before.
    With one process it does nothing.

    JAX's own hook for this, the client's missed-heartbeat callback, is out of reach:
    jax.distributed.initialize takes none, and jaxlib 0.10's binding of it aborts (std::bad_cast)."""
    if jax.process_count() == 1:
        yield
        return
    # jax.distributed exposes no handle to the key-value store of its coordination service
    client = jax._src.distributed.global_state.client
    me, count = jax.process_index(), jax.process_count()
    silence_limit = heartbeat_timeout / 4
    interval = silence_limit / 10
    finished = threading.Event()

    def keys() -> dict[str, str]:
        return dict(client.key_value_dir_get(PREFIX))

    def gone(p: int, seen: dict) -> bool:
        return any(f"{PREFIX}{state}/{p}" in seen for state in ("left", "lost", "done"))

    def leave(code: int):
        """Exits now, skipping JAX's shutdown, which would wait for the processes that are gone."""
        with contextlib.suppress(Exception):  # unless the coordinator is gone already
            client.key_value_set(f"{PREFIX}left/{me}", "")
            # the coordination service lives in process 0: it waits until the others have left
            deadline = time.monotonic() + silence_limit
            while me == 0 and time.monotonic() < deadline:
                seen = keys()
                if all(gone(p, seen) for p in range(1, count)):
                    break
                time.sleep(interval)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def reason_to_stop(seen: dict, heard: dict) -> str | None:
        """Why the run must stop, from the keys: a process failed, fell silent, or another
        process has already decided so."""
        if f"{PREFIX}stop" in seen:
            return seen[f"{PREFIX}stop"]
        now = time.monotonic()
        for p in range(count):
            if p == me or f"{PREFIX}done/{p}" in seen:
                continue
            if f"{PREFIX}failed/{p}" in seen:
                return f"process {p} of {count} failed ({seen[f'{PREFIX}failed/{p}']})"
            beat = seen.get(f"{PREFIX}beat/{p}")
            if p not in heard or heard[p][0] != beat:
                heard[p] = (beat, now)  # by this process's clock: the hosts' clocks may differ
            elif now - heard[p][1] > silence_limit:
                client.key_value_set(f"{PREFIX}lost/{p}", "", allow_overwrite=True)
                return (f"process {p} of {count} stopped responding {now - heard[p][1]:.0f}s ago "
                        "(killed, out of memory, or its machine lost)")
        return None

    def watch():
        heard, beats = {}, 0
        while not finished.wait(interval):
            beats += 1
            try:
                client.key_value_set(f"{PREFIX}beat/{me}", str(beats), allow_overwrite=True)
                reason = reason_to_stop(keys(), heard)
            except Exception:  # the coordinator is gone, and JAX ends this process itself
                return
            if reason is None or finished.is_set():
                continue
            with contextlib.suppress(Exception):  # another process may have said it first
                client.key_value_set(f"{PREFIX}stop", reason)
            step = last_finished_checkpoint(Path(rundir))
            resume = (f"step {step}, the last checkpoint every process finished" if step is not None
                      else "the start (no checkpoint was finished)")
            print(f"error: {reason}: stopping all; restart all {count} processes with the same "
                  f"command, and the run resumes from {resume}", file=sys.stderr, flush=True)
            leave(1)

    thread = threading.Thread(target=watch, name="stop_together", daemon=True)
    thread.start()
    try:
        yield
    except BaseException as error:
        if isinstance(error, jax.errors.JaxRuntimeError):
            # A collective fails at once on a dead peer's socket, before its silence shows: give
            # the watcher the time to find it and say so in its one line (it ends the process).
            thread.join(timeout=silence_limit + 2 * interval)
        finished.set()
        thread.join(timeout=2 * interval)
        with contextlib.suppress(Exception):  # unless the coordinator is gone already
            client.key_value_set(f"{PREFIX}failed/{me}", one_line(error), allow_overwrite=True)
        # after run_cli has printed the error, and before JAX's shutdown (atexit runs the last
        # registered first), which would wait for processes that are leaving
        atexit.register(leave, exit_code(error))
        raise
    else:
        client.key_value_set(f"{PREFIX}done/{me}", "", allow_overwrite=True)
        finished.set()
        thread.join(timeout=2 * interval)
