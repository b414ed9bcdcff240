"""Faults, third round: a diverged or damaged checkpoint never replaces a good one, interrupts keep
their word, the data is checked against what the run read, and the scripts check a model's
tokenizer. One test (at least) per kind of failure; the end-to-end ones with signals are slow."""

import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
import data
import eval as eval_py
import sample
import train
from cli import UserError, run_cli
from config import TrainConfig
from sharding import make_mesh
from test_train import REPO, TINY_OVERRIDES, files_in, launch_popen, run, run_until, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shakespeare_input) -> str:
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    run([REPO / "prepare_shakespeare.py", "--input", shakespeare_input, "--out_dir", out], check=True)
    return str(out)


@pytest.fixture(scope="module")
def small_run(data_dir, tmp_path_factory) -> Path:
    """A tiny run with checkpoints at steps 2 and 4; tests that change it work on a copy."""
    rundir = tmp_path_factory.mktemp("small") / "run"
    train.train(tiny_config(data_dir, max_steps=4, eval_interval=2), rundir)
    return rundir


def copy_of(rundir: Path, tmp_path: Path) -> Path:
    shutil.copytree(rundir, tmp_path / "run")
    return tmp_path / "run"


def a_weight_file(rundir: Path, step: int) -> Path:
    return max((rundir / "checkpoints" / str(step) / "params").rglob("d/*"),
               key=lambda p: p.stat().st_size)


def flip_bytes(path: Path) -> None:
    content = bytearray(path.read_bytes())
    for i in range(len(content) // 2, len(content) // 2 + 4):
        content[i] ^= 0xFF
    path.write_bytes(bytes(content))


# ---------------------------------------------------------------------------------------------
# Divergence: a state that is not finite, or has collapsed, is never saved


def plain_config(data_dir, **changes) -> TrainConfig:
    """The tiny config without the lookup tables (value and bigram embeddings), with which a huge
    step turns the loss into NaN before the weights' norm overflows."""
    config = tiny_config(data_dir, **changes)
    return dataclasses.replace(config, model=dataclasses.replace(
        config.model, value_embeds=False, bigram_embed=False))


def test_a_diverged_state_is_not_saved_and_the_last_good_checkpoint_is_kept(data_dir, tmp_path):
    rundir = tmp_path / "run"
    good = dict(optimizer="adamw", keep_checkpoints=1)
    train.train(plain_config(data_dir, max_steps=4, eval_interval=2, **good), rundir)
    # one step at this learning rate overflows the weights; an evaluation (and save) every step
    diverging = plain_config(data_dir, max_steps=8, eval_interval=1, learning_rate=1e30, min_lr=0,
                             **good)
    with pytest.raises(UserError, match=r"the weights' norm is inf at step 5: not saved; the last "
                                        r"good checkpoint, step 4, is kept: lower --learning_rate"):
        train.train(diverging, rundir)
    assert checkpoints.checkpoint_manager(rundir).all_steps() == [4]  # not rotated away
    resumed = train.train(plain_config(data_dir, max_steps=6, eval_interval=2, **good), rundir)
    assert "resuming at step 4/6" in (rundir / "log.txt").read_text()
    assert checkpoints.all_finite(eqx.filter(resumed, eqx.is_array))


def test_a_collapsed_run_stops_with_one_line_instead_of_ending_quietly(data_dir, tmp_path):
    # decay so strong that the weights die: uniform guessing, a gradient of exactly zero
    config = tiny_config(data_dir, max_steps=60, eval_interval=20, weight_decay=100.0,
                         learning_rate=0.05, muon_learning_rate=0.05)
    with pytest.raises(UserError, match=r"the model collapsed: grad norm 0.0e\+00 \(it can no longer "
                                        r"learn\), val loss 4.1744 against uniform guessing's "
                                        r"ln\(vocab_size\) = 4.1744 at step 20: not saved"):
        train.train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / "20").exists()


def test_a_checkpoint_with_non_finite_weights_is_set_aside_and_the_run_resumes_before_it(
        data_dir, small_run, tmp_path):
    rundir = copy_of(small_run, tmp_path)
    config = tiny_config(data_dir, max_steps=4, eval_interval=2)
    # step 4 rewritten with NaN weights, as a run from before this check could save them
    abstract_params, abstract_opt, _, _ = train.abstract_state(config, make_mesh(config))
    manager = checkpoints.checkpoint_manager(rundir, keep_last=3)
    params, opt_state, run_state = checkpoints.restore_checkpoint(manager, 4, abstract_params,
                                                                  abstract_opt)
    shutil.rmtree(rundir / "checkpoints" / "4")
    manager.reload()
    nan = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), params)
    checkpoints.save_checkpoint(manager, 4, nan, opt_state, run_state["sampler"], run_state["key"])
    checkpoints.seal(manager)
    manager.close()

    train.train(tiny_config(data_dir, max_steps=6, eval_interval=2), rundir)
    log = (rundir / "log.txt").read_text()
    assert "checkpoint 4 set aside to" in log and "its weights are not finite" in log, log
    assert "resuming from the newest intact checkpoint, step 2" in log


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: a checksum per checkpoint, checked by every reader


def test_flipped_bytes_are_found_by_every_reader_and_set_aside_by_training(data_dir, small_run,
                                                                           tmp_path):
    rundir = copy_of(small_run, tmp_path)
    assert all((rundir / "checkpoints" / s / checkpoints.CHECKSUMS).exists() for s in ("2", "4"))
    flip_bytes(a_weight_file(rundir, 4))
    # sample.py, eval.py, export.py: the damaged one skipped, in a line, the next one used
    notes = []
    _, _, step = checkpoints.load_model(rundir, "latest", note=notes.append)
    assert step == 2 and len(notes) == 1, notes
    assert notes[0].startswith("checkpoint 4 skipped (damaged: params/") and "checksum" in notes[0]
    with pytest.raises(UserError, match=r"checkpoint 4 in .* cannot be used \(damaged: params/.* "
                                        r"does not match its checksum\): pass another --checkpoint"):
        checkpoints.load_model(rundir, 4)
    # training sets it aside, whole, with the reason, and resumes from the newest intact one
    train.train(tiny_config(data_dir, max_steps=6, eval_interval=2), rundir)
    log = (rundir / "log.txt").read_text()
    assert "resuming from the newest intact checkpoint, step 2" in log, log
    [aside] = list((rundir / "damaged_checkpoints").iterdir())
    assert aside.name.startswith("4-") and (aside / "params").is_dir()
    assert (aside / "why.txt").read_text().startswith("damaged: params/")
    assert f"checkpoint 4 set aside to {aside}" in log


def test_a_finished_run_started_again_compiles_no_step_unless_set_back(data_dir, small_run,
                                                                      tmp_path, caplog):
    rundir = copy_of(small_run, tmp_path)

    def step_compiles():
        caplog.clear()
        jax.clear_caches()  # a step compiled by an earlier run in this process would not be logged
        with jax.log_compiles(True), caplog.at_level("WARNING"):
            train.train(tiny_config(data_dir, max_steps=4, eval_interval=2), rundir)
        return sum(r.message.startswith("Compiling jit(train_step)") for r in caplog.records)

    # nothing to do: no compile ahead (its thread would hold the process's exit until it ended)
    assert step_compiles() == 0
    flip_bytes(a_weight_file(rundir, 4))
    assert step_compiles() == 1  # set back to step 2 by the damaged 4: compiled when first asked
    assert "resuming from the newest intact checkpoint, step 2" in (rundir / "log.txt").read_text()


def test_a_checkpoint_rotated_away_while_loading_is_not_called_damaged(small_run, tmp_path,
                                                                       monkeypatch):
    rundir = copy_of(small_run, tmp_path)
    # the list of steps was read while 4 was there; a running training then rotated it away
    monkeypatch.setattr(checkpoints, "candidate_steps", lambda rundir, which: [4, 2])
    shutil.rmtree(rundir / "checkpoints" / "4")
    notes = []
    _, _, step = checkpoints.load_model(rundir, "latest", note=notes.append)
    assert step == 2 and notes == ["checkpoint 4 skipped (rotated away by the training running "
                                   "there while this loaded: not damaged)"]


def test_a_run_state_without_its_fields_is_a_damaged_checkpoint_not_a_traceback(data_dir, small_run,
                                                                                tmp_path):
    for saved, words in [({}, "sampler"), ({"sampler": {"seed": 1}, "key": [0, 0]}, "sampler.step"),
                         ({"sampler": {"seed": 1, "step": 2}}, "dropout key"),
                         ({"sampler": {"seed": 1, "step": 2}, "key": [0, 2**32]}, "dropout key")]:
        with pytest.raises(checkpoints.Damaged, match=words):
            checkpoints.read_run_state(saved)
    assert checkpoints.read_run_state({"sampler": {"seed": 0, "step": 1}, "key": [1, 2]})["key"].dtype \
        == np.uint32
    # end to end: the JSON edited by hand (its checksums gone too): set aside, named, resumed before
    rundir = copy_of(small_run, tmp_path)
    [state_file] = [p for p in (rundir / "checkpoints" / "4" / "run_state").rglob("*") if p.is_file()
                    and p.name != "commit_success.txt"]
    state_file.write_text(json.dumps({"step": 4, "val_loss": 3.0}))
    (rundir / "checkpoints" / "4" / checkpoints.CHECKSUMS).unlink()
    train.train(tiny_config(data_dir, max_steps=6, eval_interval=2), rundir)
    log = (rundir / "log.txt").read_text()
    assert "(damaged: its run_state has no batch sampler position" in log, log
    assert "resuming from the newest intact checkpoint, step 2" in log


# ---------------------------------------------------------------------------------------------
# Interrupts (the second Ctrl-C during a save and SIGHUP: tests/test_train.py, with the others)


# launch.py whose first step receives a Ctrl-C, as a user's key press lands while it compiles
CTRL_C_IN_FIRST_STEP = """
import os, runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
sys.path.insert(0, {repo!r})
import train
make_train_step = train.make_train_step

def make_interrupted_step(*args, **kwargs):
    step = make_train_step(*args, **kwargs)
    def first(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return step(*args, **kwargs)
    return first

train.make_train_step = make_interrupted_step
sys.argv = ["launch.py", *{args!r}]
runpy.run_path("launch.py", run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_before_the_first_step_exits_130_and_leaves_the_run_directory_as_it_was(
        data_dir, small_run, tmp_path):
    def interrupted(rundir, *overrides):
        args = ["--config=shakespeare_char_cpu", f"--data_dir={data_dir}", f"--rundir={rundir}",
                *TINY_OVERRIDES, *overrides]
        result = run(["-c", CTRL_C_IN_FIRST_STEP.format(repo=str(REPO), args=args)])
        assert result.returncode == 130, result.stderr  # not 139, a segmentation fault
        assert "Traceback" not in result.stderr and "Fatal" not in result.stderr, result.stderr
        return result

    interrupted(tmp_path / "new", "--max_steps=4")
    assert not (tmp_path / "new").exists()
    rundir = copy_of(small_run, tmp_path)
    before = files_in(rundir)
    interrupted(rundir, "--max_steps=40", "--learning_rate=5e-4")  # a resume that changes a setting
    assert files_in(rundir) == before  # config.json's history, log.txt, events: as they were


@pytest.mark.slow
def test_ctrl_c_while_sampling_exits_130_not_with_a_segmentation_fault(small_run):
    as_in_a_terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        f"sys.argv = ['sample.py', '--rundir={small_run}', '--max_new_tokens=200000', "
                        "'--num_samples=4']; runpy.run_path('sample.py', run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", as_in_a_terminal], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.startswith("sampling"):  # compiling or generating: either was a crash
            process.send_signal(signal.SIGINT)
            break
    process.communicate(timeout=300)
    assert process.returncode == 130


# ---------------------------------------------------------------------------------------------
# Data under a run


def a_copy_of_the_data(data_dir, tmp_path) -> Path:
    shutil.copytree(data_dir, tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.slow
def test_a_split_truncated_under_a_running_job_is_one_line_not_a_bus_error(data_dir, tmp_path):
    data_copy = a_copy_of_the_data(data_dir, tmp_path)
    process = launch_popen(data_copy, tmp_path / "run", "--max_steps=100000", "--eval_interval=1000")
    out, err = run_until(process, "step 3 |", lambda p: os.truncate(data_copy / "train.bin", 1000))
    assert process.returncode == 2, (process.returncode, err)  # SIGBUS was -7
    assert err.strip().splitlines() == [f"error: {data_copy / 'train.bin'} changed under this job: "
                                        "it now holds 1,000 bytes, 2,007,708 when it was opened; "
                                        "restore it (or prepare the dataset again) and rerun"]


def test_a_split_written_during_a_run_or_rewritten_before_its_resume_is_noticed(data_dir, tmp_path):
    data_copy = a_copy_of_the_data(data_dir, tmp_path)
    stamps = data.file_stamps(data_copy)
    assert data.changed_since(data_copy, stamps) is None
    os.utime(data_copy / "val.bin", ns=(0, stamps["val"][1] + 1))  # written: its time moves
    written = data.changed_since(data_copy, stamps)
    assert written == f"{data_copy / 'val.bin'} was written (its size or time changed)"
    # resumed after train.bin was rewritten in place, meta.json untouched: refused in one line
    rundir = tmp_path / "run"
    config = tiny_config(str(data_copy), max_steps=2, eval_interval=2)
    train.train(config, rundir)
    with open(data_copy / "train.bin", "r+b") as f:
        f.seek(100)
        f.write(bytes(100))
    with pytest.raises(UserError, match="train.bin was rewritten since the run in .* last read it"):
        train.train(tiny_config(str(data_copy), max_steps=4, eval_interval=2), rundir)
    # the same bytes back, only its time changed (a copy, a touch): the hash says it is the same
    shutil.copyfile(Path(data_dir) / "train.bin", data_copy / "train.bin")
    train.train(tiny_config(str(data_copy), max_steps=4, eval_interval=2), rundir)
    assert "resuming at step 2/4" in (rundir / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------
# The other scripts check what a model's token ids mean


def test_eval_refuses_data_whose_ids_mean_other_characters(small_run, tmp_path, capsys):
    run_chars = json.loads((small_run / "config.json").read_text())["data"]["chars"]
    rng = np.random.default_rng(0)
    data.write_dataset(tmp_path / "other", rng.integers(0, 65, 500), rng.integers(0, 65, 100),
                       {"tokenizer": "char", "chars": run_chars[::-1], "vocab_size": 65,
                        "source": "test"})
    with pytest.raises(SystemExit):
        run_cli(lambda: eval_py.main([f"--rundir={small_run}", f"--data_dir={tmp_path / 'other'}"]))
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'other'}'s token ids mean other tokens than the model's (the "
                   "same 65 characters numbered in another order): pass a --data_dir prepared with "
                   "the model's tokenizer\n")


@pytest.mark.slow
def test_an_exported_character_run_samples_with_its_own_characters_and_a_shared_file_mode(
        data_dir, tmp_path, capsys):
    rundir = tmp_path / "run"
    gpt2_like = ["--model.position_embedding=learned", "--model.norm=layer", "--model.bias=true",
                 "--model.qk_norm=false", "--model.mlp_activation=gelu",
                 "--model.value_embeds=false", "--model.bigram_embed=false"]
    run([REPO / "launch.py", "--config=shakespeare_char_cpu", f"--data_dir={data_dir}",
         f"--rundir={rundir}", *TINY_OVERRIDES, *gpt2_like, "--max_steps=2", "--eval_interval=2"],
        check=True)
    run([REPO / "export.py", f"--rundir={rundir}", f"--out={tmp_path / 'out'}"], check=True)
    modes = {stat.S_IMODE((tmp_path / "out" / name).stat().st_mode)
             for name in ("config.json", "model.safetensors")}
    assert len(modes) == 1, modes  # both as any new file (umask), not 0600 for the weights
    greedy = ["--start=ROMEO:", "--temperature=0", "--num_samples=1", "--max_new_tokens=20",
              "--dtype=float32"]
    sample.main([f"--rundir={rundir}", *greedy])
    from_run = capsys.readouterr().out
    sample.main([f"--init_from={tmp_path / 'out'}", *greedy])
    assert capsys.readouterr().out == from_run  # the characters, not GPT-2's BPE
    # an export that does not say what its ids mean, and is not GPT-2's vocabulary: one line
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    del hf["eqxgpt_tokenizer"]
    (tmp_path / "out" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(SystemExit):
        run_cli(lambda: sample.main([f"--init_from={tmp_path / 'out'}", *greedy]))
    assert "does not say what its token ids mean (a vocabulary of 65" in capsys.readouterr().err


@pytest.mark.parametrize("bad, words", [("--seed=-1", "--seed=-1: must be in [0, 2**63)"),
                                        (f"--seed={2**63}", "must be in [0, 2**63)"),
                                        ("--num_samples=0", "--num_samples=0: must be in [1, 2**31)"),
                                        (f"--max_new_tokens={2**31}", "must be in [0, 2**31)")])
def test_sample_refuses_seeds_and_counts_it_cannot_draw_in_one_line(small_run, bad, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: sample.main([f"--rundir={small_run}", bad]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert words in err, err
