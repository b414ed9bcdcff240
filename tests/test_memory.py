"""Out of memory is one line that says what to change, and nothing on disk is lost: a state or a
step that cannot fit is refused before it runs, an allocation failure mid-run stops after the last
checkpoint is on disk. The limit is one the test sets (an address-space limit on a subprocess, a
real failed allocation), never the machine's own memory exhausted. CPU only: the limits are the
host's."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import checkpoints
import train
from cli import UserError
from test_train import REPO, TINY_OVERRIDES, data_dir, tiny_config  # noqa: F401 -- data_dir: a fixture

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the limits here are a CPU host's address space")
LIMIT = 6 * 2**30  # address space for a launch: the tiny runs need ~2 GiB of it


LIMITED = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0})); "
           "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])").format(LIMIT)


def launch_limited(data_dir, rundir, *overrides) -> subprocess.CompletedProcess:
    """launch.py under the address-space limit (set in a shim that then becomes launch.py)."""
    args = [sys.executable, "-c", LIMITED, REPO / "launch.py", "--config=shakespeare_char_cpu",
            f"--data_dir={data_dir}", f"--rundir={rundir}", *TINY_OVERRIDES, *overrides]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)


def snapshot(rundir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(rundir)): path.read_bytes()
            for path in sorted(rundir.rglob("*")) if path.is_file()}


@pytest.mark.slow  # three launches
def test_a_state_or_step_too_large_for_the_memory_left_is_refused_in_one_line(data_dir, tmp_path):
    rundir = tmp_path / "run"
    fits = launch_limited(data_dir, rundir, "--max_steps=2", "--eval_interval=2")
    assert fits.returncode == 0, fits.stderr  # the limit leaves room for a run that fits
    before = snapshot(rundir)

    too_large = launch_limited(data_dir, rundir, "--max_steps=4", "--batch_size=65536")
    assert too_large.returncode == 2, too_large.stderr
    [line] = too_large.stderr.strip().splitlines()
    assert line.startswith("error: out of memory: the training step needs") \
        and "--batch_size=" in line and "--grad_accum=" in line, line
    assert snapshot(rundir) == before, "the refused resume changed the run directory"

    huge_model = launch_limited(data_dir, tmp_path / "huge", "--model.n_layer=8",
                                "--model.n_embd=4096")
    assert huge_model.returncode == 2, huge_model.stderr
    [line] = huge_model.stderr.strip().splitlines()
    assert line.startswith("error: out of memory: the parameters and optimizer state need"), line
    assert not (tmp_path / "huge").exists()


def test_an_allocation_failure_mid_run_is_one_line_after_the_last_checkpoint(data_dir, tmp_path,
                                                                             monkeypatch):
    make_train_step = train.make_train_step

    def failing_at_step_4(*args):
        train_step = make_train_step(*args)

        def step(params, opt_state, tokens, targets, step, key_data):
            if int(step) == 3:  # the 4th step asks for more than any host has: a real failure
                jnp.zeros(2**40, jnp.uint8).block_until_ready()
            return train_step(params, opt_state, tokens, targets, step, key_data)

        step.lower = train_step.lower
        return step

    monkeypatch.setattr(train, "make_train_step", failing_at_step_4)
    rundir = tmp_path / "run"
    with pytest.raises(UserError) as refused:
        train.train(tiny_config(data_dir, max_steps=8, eval_interval=2), rundir)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("out of memory during the run"), message
    assert f"--rundir={rundir}" in message and "--batch_size=" in message
    assert checkpoints.checkpoint_manager(rundir).all_steps() == [2]
    assert (rundir / "checkpoints" / "2" / "checksums.json").exists()  # sealed: on disk
