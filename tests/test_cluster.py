"""One training over several processes, on one CPU machine as on a cluster: SLURM's environment
joined by JAX's own detection (through cluster/train.sbatch and a stand-in for srun), parity
with one process, resume on another device and process count, one process dying or failing.

Each process gets fake CPU devices (XLA_FLAGS before jax starts, so every run is a subprocess);
the processes talk through gloo on localhost. The runs are tiny: a few steps each.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import multihost
from cli import UserError
from conftest import fake_devices
from test_train import LIGHT

REPO = Path(__file__).resolve().parents[1]
# Small enough to compile and run in seconds; float32 so runs on different meshes agree closely.
# Dropout on, so a resume that lost the keys (or the sampler's position) shows in the losses;
# lr_decay_steps fixes the schedule whatever max_steps a piece of a run stops at.
RUN = ["--config=shakespeare_char_cpu", "--model.n_layer=2", "--model.n_embd=64",
       "--model.n_head=4", "--model.block_size=32", "--model.dropout=0.1", "--batch_size=8",
       "--eval_iters=2", "--log_interval=1", "--warmup_steps=2", "--lr_decay_steps=6",
       "--eval_interval=2"]
# Two processes add the halves over gloo, one process over its own devices: the sums' order
# differs, so the losses are not bitwise equal (from step 1: the loss's own mean), but they stay
# within one float32 ulp (1.2e-7 relative) over these 6 steps, on every path measured.
LOSS_TOLERANCE = 1e-6
HEARTBEAT = 12  # seconds: a process silent for a quarter of it stops the run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shakespeare_input) -> str:
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    subprocess.run([sys.executable, "prepare_shakespeare.py", "--input", shakespeare_input,
                    "--out_dir", out], cwd=REPO, check=True, capture_output=True)
    return str(out)


def environment(devices: int, **variables) -> dict:
    """os.environ without any SLURM variable of the machine running the tests, with `devices`
    fake CPU devices (on CPU even where a GPU is present) and the given variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, **fake_devices(devices), "PYTHONUNBUFFERED": "1", **variables}


def launch(data_dir, rundir, *args, devices: int, env=None) -> subprocess.CompletedProcess:
    """One process of launch.py, to its end."""
    return subprocess.run([sys.executable, "launch.py", *RUN, f"--data_dir={data_dir}",
                           f"--rundir={rundir}", *args], cwd=REPO, capture_output=True, text=True,
                          env=env or environment(devices), timeout=300, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_processes(data_dir, rundir, *args, count=2, devices=1, script=None):
    """count processes of launch.py (or of the script that runs it) joined by explicit flags."""
    coordinator = f"127.0.0.1:{free_port()}"
    program = ["-c", script] if script else ["launch.py"]
    return [subprocess.Popen(
        [sys.executable, *program, *RUN, f"--data_dir={data_dir}", f"--rundir={rundir}", *args,
         "--multihost", f"--coordinator={coordinator}", f"--num_processes={count}",
         f"--process_id={i}"], cwd=REPO, env=environment(devices), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(count)]


def finish(processes) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process, once all have ended."""
    outputs = [p.communicate(timeout=300) for p in processes]
    return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs)]


def losses(rundir) -> dict[int, float]:
    """train/loss at every step the run's TensorBoard events hold, over all its launches."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(rundir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def position(rundir, step: int) -> dict:
    """Where the checkpoint at step left the run: its step, the sampler's state, the PRNG key."""
    state = json.loads((Path(rundir) / "checkpoints" / str(step) / "run_state" / "metadata").read_text())
    return {name: state[name] for name in ("step", "sampler", "key")}


def assert_same_losses(rundir, reference, steps):
    got, want = losses(rundir), losses(reference)
    assert sorted(got) == list(steps), sorted(got)
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps],
                               rtol=LOSS_TOLERANCE, atol=0)


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory) -> Path:
    """The run every other is compared with: 6 steps on 1 process with 4 devices."""
    rundir = tmp_path_factory.mktemp("one_process") / "run"
    result = launch(data_dir, rundir, "--max_steps=6", devices=4)
    assert result.returncode == 0, result.stderr
    return rundir


# ---------------------------------------------------------------------------------------------
# SLURM: srun's environment, detected by jax.distributed; and sbatch without srun

# srun as it starts one job step's tasks on one node: SLURM_NTASKS copies of the command, each
# with the variables srun sets, their output lines labelled with the task's index (srun --label).
FAKE_SRUN = """#!{python}
import os, subprocess, sys, threading
command = sys.argv[1:]
while command[0].startswith("-"):  # srun's own options
    command.pop(0)
count = int(os.environ["SLURM_NTASKS"])
step = {{"SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": os.environ["SLURM_JOB_NODELIST"],
        "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": str(count), "SLURM_NODEID": "0"}}
tasks = [subprocess.Popen(command, env={{**os.environ, **step, "SLURM_PROCID": str(i),
                                         "SLURM_LOCALID": str(i)}},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
         for i in range(count)]

def relay(i):
    for line in tasks[i].stdout:
        sys.stdout.write(f"{{i}}: {{line}}")
        sys.stdout.flush()

relays = [threading.Thread(target=relay, args=(i,)) for i in range(count)]
[r.start() for r in relays]
[r.join() for r in relays]
sys.exit(max(task.wait() for task in tasks))
"""


def slurm_job_id() -> str:
    """A job id whose coordinator port (JAX takes 61440 + id % 4096) is free on this machine."""
    for port in random.sample(range(61440, 65536), 4096):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return str(4096 * 1000 + port - 61440)
    raise AssertionError("no free port in 61440-65535")


def batch_environment(tasks: int) -> dict:
    """What a job's batch script sees: the job's variables, one task of its own, no job step."""
    return {"SLURM_JOB_ID": slurm_job_id(), "SLURM_JOB_NAME": "eqxgpt", "SLURM_SUBMIT_DIR": str(REPO),
            "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost", "SLURM_NNODES": "1",
            "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": str(tasks),
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


@pytest.mark.slow
def test_sbatch_script_runs_tasks_that_join_by_detection_and_train_like_one_process(
        data_dir, one_process, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "srun").chmod(0o755)
    rundir = tmp_path / "run"
    env = environment(2, **batch_environment(tasks=2), RUNDIR=str(rundir),
                      PYTHON=sys.executable, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # no --coordinator, --num_processes or --process_id: JAX reads them from srun's variables
    result = subprocess.run(["bash", "cluster/train.sbatch", *RUN, f"--data_dir={data_dir}",
                             "--max_steps=6"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    by_task = {i: [line[3:] for line in result.stdout.splitlines() if line.startswith(f"{i}: ")]
               for i in range(2)}
    assert any("mesh {'data': 1, 'fsdp': 4} on 4 cpu devices in 2 processes" in line
               for line in by_task[0]), result.stdout
    assert not any(line.startswith("step") for line in by_task[1]), by_task[1]  # only 0 logs

    # 2 processes x 2 devices, each reading half of every batch, train as 1 process x 4 devices
    assert_same_losses(rundir, one_process, steps=range(1, 7))
    assert position(rundir, 6) == position(one_process, 6)
    # only process 0 writes the run's files: one event file, every log line once
    assert len(list(rundir.glob("events.out.tfevents.*"))) == 1
    log = (rundir / "log.txt").read_text().splitlines()
    assert len(log) == len(set(log)) and sum(line.startswith("step 6 | loss") for line in log) == 1, log


@pytest.mark.slow
def test_multihost_in_a_batch_script_without_srun_says_to_start_the_tasks_with_srun(
        data_dir, tmp_path):
    env = environment(2, **batch_environment(tasks=2))
    result = launch(data_dir, tmp_path / "run", "--multihost", devices=2, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "outside srun" in lines[0] and "cluster/train.sbatch" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.slow
def test_sigterm_to_every_task_saves_the_same_step_everywhere_and_exits_0(data_dir, tmp_path):
    # what `#SBATCH --signal=TERM@300` sends, to every task at once, before the time limit
    rundir = tmp_path / "run"
    processes = launch_processes(data_dir, rundir, "--max_steps=40", *LIGHT)
    for line in processes[0].stdout:
        if line.startswith("step 3 |"):
            break
    for process in processes:
        process.send_signal(signal.SIGTERM)
    (code, out, err), (code_1, out_1, err_1) = finish(processes)
    assert code == 0 and code_1 == 0, err + err_1
    stopped = re.search(r"stopped by SIGTERM at step (\d+): checkpoint saved \(on disk\)", out)
    assert stopped and int(stopped.group(1)) < 40, out
    assert "Traceback" not in err + err_1 and "stopped" not in out_1  # only process 0 logs
    assert int(stopped.group(1)) == multihost.last_finished_checkpoint(rundir)


# ---------------------------------------------------------------------------------------------
# Resume on another shape


@pytest.mark.slow
def test_a_run_saved_on_four_devices_resumes_on_two_processes_then_on_two_devices(
        data_dir, one_process, tmp_path):
    rundir = tmp_path / "run"
    first = launch(data_dir, rundir, "--max_steps=2", devices=4)
    assert first.returncode == 0, first.stderr

    # 1 process x 4 devices -> 2 processes x 1 device
    (code, out, err), (code_1, _, err_1) = finish(launch_processes(data_dir, rundir, "--max_steps=4"))
    assert code == 0 and code_1 == 0, err + err_1
    assert ("resuming at step 2/4" in out and
            "mesh {'data': 1, 'fsdp': 2} on 2 cpu devices in 2 processes" in out), out
    assert position(rundir, 4)["sampler"] == {"seed": 1337, "step": 4}

    # 2 processes x 1 device -> 1 process x 2 devices
    last = launch(data_dir, rundir, "--max_steps=6", devices=2)
    assert last.returncode == 0, last.stderr
    assert "resuming at step 4/6" in last.stdout and "on 2 cpu devices |" in last.stdout, last.stdout

    # the sampler's position and the dropout keys carried over: the losses of the uninterrupted
    # run, at every step once
    assert_same_losses(rundir, one_process, steps=range(1, 7))
    assert position(rundir, 6) == position(one_process, 6)


# ---------------------------------------------------------------------------------------------
# One process dies or fails


def test_a_heartbeat_timeout_too_short_to_watch_is_refused_before_joining():
    with pytest.raises(UserError, match="--heartbeat_timeout=3: must be at least 4 seconds"):
        multihost.join(heartbeat_timeout=3)

# launch.py, with a failure planted in process {process} when its step {step} is logged
PLANTED = """
import os, runpy, signal, sys, time
sys.path.insert(0, {repo!r})
import jax, cli, train
check_finite = train.check_finite

def lose_a_peer():  # process 1 dies; process 0's collective fails first, as gloo's does then
    if jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    raise jax.errors.JaxRuntimeError("Gloo AllGather failed: planted: Connection reset by peer")

def check_finite_then_fail(pending, last_good):
    if jax.process_index() == {process} and pending and pending[-1][0] + 1 == {step}:
        print("FAILING NOW", flush=True)
        {failure}
    return check_finite(pending, last_good)

train.check_finite = check_finite_then_fail
sys.argv = ["launch.py", *sys.argv[1:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def kill_one_of_two(data_dir, rundir, process: int, step: int, max_steps: int, *args):
    """Two processes, one killed with SIGKILL at step; the survivor's (stdout, stderr), once it
    has stopped (exit code 1) within the heartbeat timeout of the death."""
    kill = PLANTED.format(repo=str(REPO), process=process, step=step,
                          failure="os.kill(os.getpid(), signal.SIGKILL)")
    processes = launch_processes(data_dir, rundir, f"--max_steps={max_steps}",
                                 f"--heartbeat_timeout={HEARTBEAT}", *args, script=kill)
    killed, survivor = processes[process], processes[1 - process]
    killed.wait(timeout=300)
    died = time.monotonic()
    survivor.wait(timeout=300)
    stopped_after = time.monotonic() - died
    out, err = survivor.communicate()
    assert killed.returncode == -signal.SIGKILL, killed.communicate()
    assert survivor.returncode == 1, out + err
    assert stopped_after < HEARTBEAT, stopped_after  # within the heartbeat timeout
    return out, err


@pytest.mark.slow
def test_a_killed_process_stops_the_other_with_one_line_and_the_restart_resumes(
        data_dir, one_process, tmp_path):
    rundir = tmp_path / "run"
    out, err = kill_one_of_two(data_dir, rundir, process=1, step=5, max_steps=6)
    lines = err.strip().splitlines()
    # one line, and none of JAX's abort (its coordination service's stack dump)
    assert len(lines) == 1 and "Traceback" not in err and "Terminating" not in err, err
    line = lines[0]
    assert line.startswith("error: process 1 of 2 stopped responding"), line
    assert "restart all 2 processes with the same command, and the run resumes from step" in line

    # restarted, the run goes on from the checkpoint the line named: the uninterrupted losses
    step = int(line.split("resumes from step ")[1].split(",")[0])
    assert step in (2, 4)  # saved at 2 and 4; 4 only if process 1 finished it before it died
    (code, out, err), (code_1, _, err_1) = finish(
        launch_processes(data_dir, rundir, "--max_steps=6", f"--heartbeat_timeout={HEARTBEAT}"))
    assert code == 0 and code_1 == 0, err + err_1
    assert f"resuming at step {step}/6" in out, out
    restarted = range(step + 1, 7)
    np.testing.assert_allclose([losses(rundir)[s] for s in restarted],
                               [losses(one_process)[s] for s in restarted], rtol=LOSS_TOLERANCE)


@pytest.mark.slow
def test_a_collective_that_fails_because_a_peer_died_is_the_same_one_line(data_dir, tmp_path):
    # Under load, a survivor's all-gather can fail on the dead peer's socket before the silence
    # is noticed: that error must end in the same line, not in a traceback. --debug: no
    # checkpoint save in flight, whose wait would give the silence time to show first.
    lose = PLANTED.format(repo=str(REPO), process="jax.process_index()", step=3,
                          failure="lose_a_peer()")
    (code, out, err), (code_1, _, _) = finish(launch_processes(
        data_dir, tmp_path / "run", "--max_steps=6", f"--heartbeat_timeout={HEARTBEAT}",
        "--debug", *LIGHT, script=lose))
    assert code_1 == -signal.SIGKILL
    assert "FAILING NOW" in out and code == 1, out + err  # process 0 did raise the error
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: process 1 of 2 stopped responding"), lines[0]
    assert "restart all 2 processes with the same command, and the run resumes from" in lines[0]


@pytest.mark.slow
def test_an_error_in_the_coordinator_process_stops_the_other_at_once(data_dir, tmp_path):
    fail = PLANTED.format(repo=str(REPO), process=0, step=3,
                          failure='raise cli.UserError("planted: the disk of process 0 broke")')
    started = time.monotonic()
    (code_0, out_0, err_0), (code_1, _, err_1) = finish(launch_processes(
        data_dir, tmp_path / "run", "--max_steps=100", f"--heartbeat_timeout={HEARTBEAT}", *LIGHT,
        script=fail))
    assert "FAILING NOW" in out_0, out_0 + err_0
    # without stop_together both wait for each other in JAX's shutdown, then abort (5 minutes)
    assert time.monotonic() - started < 120
    # the failing process: its own line and exit code; the other: one line naming it
    assert code_0 == 2 and err_0.strip().splitlines() == [
        "error: planted: the disk of process 0 broke"], err_0
    named = ("error: process 0 of 2 failed (error: planted: the disk of process 0 broke): stopping "
             "all; restart all 2 processes with the same command, and the run resumes from step 2, "
             "the last checkpoint every process finished")
    assert code_1 == 1 and err_1.strip().splitlines() == [named], err_1


@pytest.mark.slow
def test_the_coordinator_process_killed_stops_the_other_with_the_same_one_line(data_dir, tmp_path):
    # process 0 holds JAX's coordination service: with it gone the survivor can read no beats
    out, err = kill_one_of_two(data_dir, tmp_path / "run", 0, 6, 100, *LIGHT)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "Terminating" not in err, err
    assert lines[0].startswith("error: process 0 of 2 stopped responding"), lines[0]
    assert "restart all 2 processes with the same command, and the run resumes from step" \
        in lines[0], lines[0]
    assert int(lines[0].split("resumes from step ")[1].split(",")[0]) in (2, 4)
