"""Bad input, second round: config files that raise, damaged meta.json, two trainings in one run
directory, resumes on other data or with changed settings, the run directory's own files, a full
or read-only disk, and the other scripts' outputs. Each ends in one `error:` line, exit code 2,
and leaves the files it was given as they were.

Most run a script's main() in this process up to its refusal, which comes before any compile.
The full-disk and read-only cases mount a small tmpfs in a private mount namespace (unshare -m).
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import bench
import checkpoints
import cli
import data
import export
import launch
import prepare_openwebtext
from cli import UserError, run_cli
from config import TrainConfig, with_data_vocab

REPO = Path(__file__).resolve().parents[1]
CHARS = "abcdefghij"
TINY = ["--config=shakespeare_char_cpu", "--model.n_layer=2", "--model.n_embd=64", "--model.n_head=4",
        "--model.block_size=32", "--batch_size=8", "--eval_iters=2", "--log_interval=1",
        "--warmup_steps=2", "--eval_interval=2", "--max_steps=2"]  # short, should a refusal fail


def one_line_error(main, capsys, *words) -> str:
    """Runs main() as a script runs it; asserts exit 2 and one `error:` line holding words."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def files_in(directory) -> dict[str, bytes]:
    directory = Path(directory)
    if directory.is_file():
        return {".": directory.read_bytes()}
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def make_dataset(path: Path, n_train=400, n_val=100, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    data.write_dataset(path, rng.integers(0, len(CHARS), n_train), rng.integers(0, len(CHARS), n_val),
                       {"tokenizer": "char", "chars": CHARS, "vocab_size": len(CHARS), "source": "test"})
    return path


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


def write_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    (directory / "meta.json").write_text(json.dumps({**meta, **changes}))


# ---------------------------------------------------------------- config files


CONFIG_MISTAKES = {  # file text, the line to name, a word of the message
    "unknown field": ("from train import TrainConfig\n\nconfig = TrainConfig(batch_sise=8)\n", 3,
                      "batch_sise"),
    "syntax error": ("from train import TrainConfig\nconfig = TrainConfig(\n", 2, "SyntaxError"),
    "bad import": ("import no_such_module\n", 1, "no_such_module"),
    "name error": ("x = 1\nconfig = undefined_name\n", 2, "undefined_name"),
    "bad value": ("from train import TrainConfig\nconfig = TrainConfig(batch_size=0)\n", 2, "batch_size"),
}


@pytest.mark.parametrize("script", [launch, bench])
@pytest.mark.parametrize("mistake", CONFIG_MISTAKES)
def test_a_config_file_that_raises_is_one_line_naming_its_file_and_line(script, mistake, tmp_path,
                                                                        capsys, monkeypatch):
    text, line, word = CONFIG_MISTAKES[mistake]
    config = tmp_path / "broken.py"
    config.write_text(text)
    monkeypatch.chdir(tmp_path)  # where launch.py would make runs/
    one_line_error(lambda: script.main([f"--config={config}"]), capsys, f"{config}, line {line}", word)
    assert files_in(tmp_path) == {"broken.py": text.encode()}


# ---------------------------------------------------------------- meta.json and token ids


@pytest.mark.parametrize("changes, key", [
    ({"dtype": "float16"}, "dtype"), ({"dtype": "uint12"}, "dtype"),
    ({"train_tokens": None}, "train_tokens"), ({"val_tokens": -3}, "val_tokens"),
    ({"vocab_size": "10"}, "vocab_size"), ({"vocab_size": True}, "vocab_size"),
    ({"tokenizer": 7}, "tokenizer"), ({"chars": "abc"}, "chars"),
    ({"tokenizer": "gpt2", "vocab_size": 70000}, "dtype"),  # more ids than uint16 holds
])
def test_meta_json_of_the_wrong_type_or_value_is_refused_naming_the_key(dataset, changes, key, capsys):
    write_meta(dataset, **changes)
    before = files_in(dataset)
    one_line_error(lambda: data.load_meta(dataset), capsys, "meta.json", key, "--overwrite")
    assert files_in(dataset) == before


def test_token_ids_outside_the_vocabulary_are_refused_at_the_first_batch(dataset, capsys):
    write_meta(dataset, vocab_size=5, chars=CHARS[:5])  # the .bin files hold ids up to 9
    meta = data.load_meta(dataset)
    tokens = data.open_split(dataset, "train", meta)
    sampler = data.BatchSampler(tokens, 32, 4, vocab_size=meta["vocab_size"])
    batches = sampler.prefetch()
    one_line_error(lambda: next(batches), capsys, "train.bin", "vocabulary of 5")
    batches.close()


# ---------------------------------------------------------------- one training per run directory


def hold_lock_elsewhere(rundir: Path) -> subprocess.Popen:
    """Another process holding rundir's lock as a training does, until it is killed."""
    rundir.mkdir(parents=True, exist_ok=True)
    script = ("import fcntl, os, sys\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
              "f.truncate(0); f.write(f'pid {os.getpid()} on elsewhere'); f.flush()\n"
              "print('locked', flush=True)\nsys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(rundir / "train.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_second_training_in_a_run_directory_is_refused_naming_the_first(dataset, tmp_path, capsys):
    rundir = tmp_path / "run"
    rundir.mkdir()
    with checkpoints.rundir_lock(rundir):
        with pytest.raises(UserError, match=f"pid {os.getpid()} "):  # held while inside
            with checkpoints.rundir_lock(rundir):
                pass
    with pytest.raises(KeyError):  # released however the training ends
        with checkpoints.rundir_lock(rundir):
            raise KeyError
    holder = hold_lock_elsewhere(rundir)
    try:
        before = files_in(rundir)
        one_line_error(lambda: launch.main([*TINY, f"--data_dir={dataset}", f"--rundir={rundir}"]),
                       capsys, "in use by another training", f"pid {holder.pid}")
        assert files_in(rundir) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died without unlocking: its lock file is stale, and the next training takes it
    assert (rundir / "train.lock").read_text() == f"pid {holder.pid} on elsewhere"
    with checkpoints.rundir_lock(rundir):
        assert (rundir / "train.lock").read_text().startswith(f"pid {os.getpid()} ")


# ---------------------------------------------------------------- resuming


def tiny_config(data_dir) -> TrainConfig:
    """The config a run on data_dir resolves, its vocabulary the data's, as train.train does."""
    config = cli.apply_overrides(cli.load_config("shakespeare_char_cpu", TrainConfig),
                                 [f"--data_dir={data_dir}", *TINY[1:]])
    return with_data_vocab(config, data.load_meta(data_dir))


def fake_run(rundir: Path, config: TrainConfig, meta: dict) -> None:
    """A run directory's config.json as run_outputs writes it (no checkpoints needed)."""
    rundir.mkdir(parents=True)
    checkpoints.write_json_atomic(rundir / "config.json", {
        "config": dataclasses.asdict(config),
        "data": {"dir": config.data_dir, "train_sha256": meta["train_sha256"],
                 "val_sha256": meta["val_sha256"]}})


def test_a_resume_on_other_data_or_with_a_setting_it_cannot_change_is_refused(dataset, tmp_path,
                                                                              capsys):
    rundir = tmp_path / "run"
    fake_run(rundir, tiny_config(dataset), data.load_meta(dataset))
    other = make_dataset(tmp_path / "other", seed=1)
    before = files_in(rundir)
    resume = lambda *args: lambda: launch.main([f"--rundir={rundir}", *args])  # noqa: E731
    one_line_error(resume(f"--data_dir={other}"), capsys, "other data", "new --rundir")
    one_line_error(resume("--seed=7"), capsys, "seed=1337", "seed=7", "new --rundir")
    assert files_in(rundir) == before
    with pytest.raises(UserError, match="init_from"):
        checkpoints.check_rundir(dataclasses.replace(tiny_config(dataset), init_from="gpt2"), rundir)
    # the same data elsewhere, and settings a resume may change, pass
    moved = make_dataset(tmp_path / "moved")
    config = dataclasses.replace(tiny_config(moved), learning_rate=5e-4, batch_size=16)
    changes = checkpoints.check_rundir(config, rundir, data.load_meta(moved))
    assert changes == {"data_dir": (str(dataset), str(moved)), "learning_rate": (1e-3, 5e-4),
                       "batch_size": (8, 16)}


@pytest.mark.slow
def test_a_changed_learning_rate_takes_effect_is_logged_and_kept_in_the_history(dataset, tmp_path,
                                                                               capsys):
    rundir = tmp_path / "run"
    args = [*TINY, f"--data_dir={dataset}", f"--rundir={rundir}"]  # in-process: half the time
    launch.main([*args, "--max_steps=2"])
    capsys.readouterr()
    launch.main([*args, "--max_steps=4", "--learning_rate=5e-4"])
    resumed = capsys.readouterr()
    assert "resumed with learning_rate 0.001 -> 0.0005, max_steps 2 -> 4" in resumed.out
    recorded = json.loads((rundir / "config.json").read_text())
    assert recorded["config"]["learning_rate"] == 5e-4
    assert recorded["history"][0]["step"] == 2
    assert recorded["history"][0]["changes"] == {"learning_rate": [1e-3, 5e-4], "max_steps": [2, 4]}
    # the schedule's peak is the new one: warmup ended at step 2, cosine from 5e-4 down
    lrs = [float(x) for x in re.findall(r"step [34] \| loss \S+ \| lr (\S+)", resumed.out)]
    assert lrs and max(lrs) <= 5e-4


# ---------------------------------------------------------------- paths that are not what they should be


def launch_cases(dataset: Path, tmp_path: Path) -> dict:
    """{case: (argv, the path that must be left as it was, words of the message)}"""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    with_file = tmp_path / "run_with_file"
    with_file.mkdir()
    (with_file / "checkpoints").write_text("a file where the checkpoints belong")
    empty_val = tmp_path / "empty_val"
    data.write_dataset(empty_val, np.arange(400) % 10, [], {"tokenizer": "char", "chars": CHARS,
                                                           "vocab_size": 10, "source": "test"})
    run = tmp_path / "new_run"
    base = [*TINY, f"--data_dir={dataset}"]
    return {
        "rundir is a file": ([*base, f"--rundir={a_file}"], a_file, ["a_file is a file"]),
        "checkpoints is a file": ([*base, f"--rundir={with_file}"], with_file, ["checkpoints is a file"]),
        "data_dir is a file": ([*TINY, f"--data_dir={a_file}", f"--rundir={run}"], run,
                               ["a_file is a file", "--data_dir"]),
        "empty val split": ([*TINY, f"--data_dir={empty_val}", f"--rundir={run}"], run,
                            ["val split", "is empty"]),
        "too few devices": ([*base, "--data_parallel=2", f"--rundir={run}"], run,
                            ["needs at least 2 devices", "1 found"]),
        "cudnn on a cpu": ([*base, "--model.attention=cudnn", f"--rundir={run}"], run,
                           ["attention=cudnn", "cpu"]),
        "seed beyond 64 bits": ([*base, f"--seed={2**64}", f"--rundir={run}"], run, ["seed", "2**63"]),
    }


@pytest.mark.parametrize("case", ["rundir is a file", "checkpoints is a file", "data_dir is a file",
                                  "empty val split", "too few devices", "cudnn on a cpu",
                                  "seed beyond 64 bits"])
def test_launch_names_the_real_cause_and_writes_nothing(case, dataset, tmp_path, capsys):
    if case == "cudnn on a cpu" and jax.devices()[0].platform == "gpu":
        pytest.skip("this machine has a GPU: cuDNN attention is allowed here")
    argv, kept, words = launch_cases(dataset, tmp_path)[case]
    before = files_in(kept) if kept.exists() else None
    one_line_error(lambda: launch.main(argv), capsys, *words)
    assert (files_in(kept) if kept.exists() else None) == before


def test_multihost_without_a_cluster_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, REPO / "launch.py", *TINY, "--multihost",
                             f"--rundir={tmp_path / 'run'}", "--data_dir=/nonexistent"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --multihost: cannot join a cluster") and "--coordinator" in lines[0]
    assert not (tmp_path / "run").exists()


def test_outputs_that_are_files_are_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    one_line_error(lambda: export.main(["--rundir=/nonexistent", f"--out={a_file}"]), capsys,
                   "--out", "is a file")
    one_line_error(lambda: bench.main(["--config=shakespeare_char_cpu", f"--profile={a_file}"]),
                   capsys, "--profile", "cannot make that directory")
    assert a_file.read_text() == "keep me"


def test_bench_decode_refuses_what_only_the_training_step_takes(capsys):
    for option, words in (("--profile=/tmp/p", ["--profile", "training step"]),
                          ("--data_dir=data", ["--data_dir", "training step"]),
                          ("--max_new_tokens=0", ["--max_new_tokens", ">= 1"])):
        one_line_error(lambda: bench.main(["--config=shakespeare_char_cpu", "--decode", option]),
                       capsys, *words)


def test_plot_run_refuses_an_out_it_cannot_write(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plot_run.py's own dependency, not in requirements.txt")
    import plot_run

    for out, words in ((tmp_path / "missing" / "loss.png", ["does not exist"]),
                       (tmp_path / "loss.xyz", ["format", ".png"])):
        one_line_error(lambda: plot_run.main(["--rundir=/nonexistent", f"--out={out}"]), capsys, *words)
        assert not out.exists()


# ---------------------------------------------------------------- prepare_openwebtext.py


@pytest.mark.parametrize("documents, words", [
    ([""], ["one document", "at least two"]),
    (["one", "two", "three"], ["fell in val", "--val_fraction"]),
])
def test_openwebtext_input_that_cannot_make_a_train_and_a_val_split_is_refused(documents, words,
                                                                                tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(documents):
        (corpus / f"{i}.txt").write_text(text)
    out = tmp_path / "out"
    val_fraction = "0.999999" if len(documents) > 1 else "0.0005"
    one_line_error(lambda: prepare_openwebtext.main([f"--input={corpus}", f"--out_dir={out}",
                                                     "--num_proc=1", f"--val_fraction={val_fraction}"]),
                   capsys, *words)
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------- a full or read-only disk


def can_mount_tmpfs() -> bool:
    try:
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def test_a_full_disk_is_recognised_in_orbax_errors_that_quote_the_os():
    tensorstore_style = ValueError("RESOURCE_EXHAUSTED: Error writing ...: Failed to write 367575 "
                                   "bytes to file 13: No space left on device [os_error_code='28']")
    assert checkpoints.is_disk_full(tensorstore_style)
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("wrapped")
    except RuntimeError as e:
        assert checkpoints.is_disk_full(e)
    assert not checkpoints.is_disk_full(ValueError("a shape mismatch"))


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs `unshare -m` and mount (root in a "
                    "private mount namespace) for a small tmpfs")
def test_a_full_disk_and_a_read_only_run_directory_are_one_line_and_keep_the_checkpoints(dataset,
                                                                                        tmp_path):
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    launch_py = " ".join(["timeout -s KILL 600", sys.executable, str(REPO / "launch.py"), *TINY, f"--data_dir={dataset}",
                          f"--rundir={mnt}/run", "--optimizer=adamw"])
    # ~1.2 MB per AdamW checkpoint (Muon keeps one moment, not two): step 2's fits in 2 MB,
    # step 4's does not
    script = f"""
        mount -t tmpfs -o size=2m tmpfs {mnt}
        {launch_py} --max_steps=4 >/dev/null 2>{out}/full.err; echo $? >{out}/full.rc
        ls {mnt}/run/checkpoints >{out}/steps
        mount -o remount,ro {mnt}
        (cd {mnt}/run && find . -type f | sort | xargs sha256sum) >{out}/before
        {launch_py} --max_steps=8 >/dev/null 2>{out}/ro.err; echo $? >{out}/ro.rc
        (cd {mnt}/run && find . -type f | sort | xargs sha256sum) >{out}/after
    """
    subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                   check=True)  # each launch has its own timeout: a stuck one is killed
    read = lambda name: (out / name).read_text()  # noqa: E731
    for kind, words in (("full", ["disk holding", "is full", "last good checkpoint is step 2"]),
                        ("ro", ["cannot write to", "Read-only file system"])):
        lines = read(f"{kind}.err").strip().splitlines()
        assert read(f"{kind}.rc").strip() == "2" and len(lines) == 1, read(f"{kind}.err")
        assert lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines[0]
    assert "2" in read("steps").split()
    assert read("before") == read("after")
