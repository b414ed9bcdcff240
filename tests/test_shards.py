"""FineWeb shards as llm.c and modded-nanogpt download them (data.shard_meta, data.ShardStream):
a run on them is the run on the same tokens prepared as train.bin/val.bin, bit for bit; resume,
eval, a glob; every damaged shard refused in one line; a changed shard noticed.

The shards here are Tiny Shakespeare's first ~10k GPT-2 tokens, written in the shards' format:
three train shards of unequal sizes and one val shard. Runs are float32 on the CPU and compared
bit for bit: the same tokens must make the same batches, so the same arithmetic.
"""

import dataclasses
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import data
import eval as eval_py
import launch
import train
from cli import UserError, apply_overrides, load_config, run_cli
from config import TrainConfig, with_data_vocab
from test_train import REPO, TINY_OVERRIDES, assert_one_line_error, files_in, params_of, run

# test_train's tiny model, without the tables that grow with the vocabulary (a bigram table is
# for vocabularies up to 512; value embeddings would be a 50304-row table a layer), on 64 tokens a
# step instead of 256: at GPT-2's vocabulary the logits are most of a step's work (a 600 ms step
# under the suite's unoptimised compiles, on the AVX2 VM of BENCHMARKS.md's "The test suite's time")
OVERRIDES = ["--config=shakespeare_char_cpu", *TINY_OVERRIDES, "--model.bigram_embed=false",
             "--model.value_embeds=false", "--batch_size=4", "--model.block_size=16"]

TRAIN_SIZES = (2500, 3100, 3400)  # unequal: a shard boundary is nowhere regular
VAL_SIZE = 1000


def write_shard(path, ids, magic=data.SHARD_MAGIC, version=data.SHARD_VERSION, count=None):
    """A shard as llm.c's dev/data/data_common.py write_datafile writes one."""
    header = np.zeros(256, "<i4")
    header[:3] = magic, version, len(ids) if count is None else count
    Path(path).write_bytes(header.tobytes() + np.asarray(ids, "<u2").tobytes())


@pytest.fixture(scope="module")
def tokens(shakespeare_input) -> np.ndarray:
    ids = data.GPT2Tokenizer().encode(shakespeare_input.read_text()[:60_000])
    assert len(ids) >= sum(TRAIN_SIZES) + VAL_SIZE
    return np.asarray(ids[: sum(TRAIN_SIZES) + VAL_SIZE], np.uint16)


def train_pieces(tokens) -> list[np.ndarray]:
    return np.split(tokens[: sum(TRAIN_SIZES)], np.cumsum(TRAIN_SIZES)[:-1])


def write_shards(folder: Path, tokens) -> Path:
    """fineweb_val_000000.bin and fineweb_train_00000{1,2,3}.bin, written out of order (a
    listing that forgot to sort would read them in the order the directory keeps them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in (3, 1, 2):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", train_pieces(tokens)[i - 1])
    write_shard(folder / "fineweb_val_000000.bin", tokens[sum(TRAIN_SIZES):])
    return folder


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tokens) -> Path:
    return write_shards(tmp_path_factory.mktemp("data") / "fineweb10B", tokens)


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory, tokens) -> Path:
    """The same tokens as a prepared dataset: train.bin, val.bin, meta.json."""
    out = tmp_path_factory.mktemp("data") / "prepared"
    data.write_dataset(out, tokens[: sum(TRAIN_SIZES)], tokens[sum(TRAIN_SIZES):],
                       {**data.GPT2_BPE, "source": "test"})
    return out


def config_on(data_dir, **changes) -> TrainConfig:
    """The tiny config on data_dir, its vocabulary the data's as train.train resolves it, with
    dropout: a resume must also repeat its keys."""
    config = apply_overrides(load_config("shakespeare_char_cpu", TrainConfig),
                             [f"--data_dir={data_dir}", *OVERRIDES[1:], "--model.dropout=0.1",
                              "--eval_interval=4", "--lr_decay_steps=8"])
    config = with_data_vocab(config, data.load_meta(data_dir))
    return dataclasses.replace(config, **changes)


def eval_lines(rundir) -> list[str]:
    return re.findall(r"step \d+ \| eval: .*", (Path(rundir) / "log.txt").read_text())


@pytest.fixture(scope="module")
def straight(shard_dir, tmp_path_factory):
    """(rundir, final weights) of 8 steps on the shards, evaluated at steps 4 and 8."""
    rundir = tmp_path_factory.mktemp("runs") / "straight"
    return rundir, params_of(train.train(config_on(shard_dir, max_steps=8), rundir))


def assert_same_weights(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# Reading


def test_the_shards_read_as_one_stream_in_order_across_their_boundaries(shard_dir, tokens):
    meta = data.load_meta(shard_dir)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and "shards" in meta
    assert (meta["train_tokens"], meta["val_tokens"]) == (sum(TRAIN_SIZES), VAL_SIZE)
    assert [Path(p).name for p, _ in meta["shards"]["train"]] == [
        "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    stream, whole = data.open_split(shard_dir, "train", meta), tokens[: sum(TRAIN_SIZES)]
    assert len(stream) == len(whole)
    np.testing.assert_array_equal(np.asarray(stream), whole)
    bounds = np.cumsum(TRAIN_SIZES).tolist()  # every slice that starts or ends near a boundary
    edges = sorted({0, len(whole)} | {b + d for b in bounds[:-1] for d in (-2, -1, 0, 1)})
    for start in edges:
        for stop in edges + [len(whole) + 5]:
            np.testing.assert_array_equal(stream[start:stop], whole[start:stop])
    assert stream[2500 - 40 : 2500 + 33 + 3100 + 1].size == 40 + 3100 + 34  # three shards
    np.testing.assert_array_equal(stream[2490:2510:3], whole[2490:2510:3])
    assert stream[2500] == whole[2500] and stream[-1] == whole[-1]
    np.testing.assert_array_equal(np.asarray(data.open_split(shard_dir, "val", meta)),
                                  tokens[sum(TRAIN_SIZES):])


def test_every_slice_of_small_shards_and_an_empty_one_is_the_concatenations(tmp_path):
    sizes, rng = (3, 0, 5, 1, 4), np.random.default_rng(0)
    pieces = [rng.integers(0, 50257, n).astype(np.uint16) for n in sizes]
    for i, ids in enumerate(pieces):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", ids)
    write_shard(tmp_path / "fineweb_val_000000.bin", pieces[0])
    stream = data.open_split(tmp_path, "train", data.load_meta(tmp_path))
    whole = np.concatenate(pieces)
    for start in range(len(whole) + 2):
        for stop in range(len(whole) + 2):
            np.testing.assert_array_equal(stream[start:stop], whole[start:stop])
    assert [stream[i] for i in range(-len(whole), len(whole))] == whole.tolist() * 2


def test_a_glob_names_the_same_shards_as_their_folder(shard_dir):
    by_folder = data.load_meta(shard_dir)
    by_glob = data.load_meta(f"{shard_dir}/fineweb_*.bin")
    assert by_glob["shards"] == by_folder["shards"]
    assert data.file_stamps(f"{shard_dir}/fineweb_*.bin") == data.file_stamps(shard_dir)


def test_a_folder_whose_name_holds_wildcard_characters_is_that_folder(shard_dir, bin_dir, tmp_path):
    shards = shutil.copytree(shard_dir, tmp_path / "fineweb[1]*")
    prepared = shutil.copytree(bin_dir, tmp_path / "prepared[1]?")
    by_name = data.load_meta(shards)["shards"]
    assert by_name == {split: [[str(shards / Path(path).name), n] for path, n in listed]
                       for split, listed in data.load_meta(shard_dir)["shards"].items()}
    assert not data.is_shards(prepared)
    assert data.load_meta(prepared)["train_tokens"] == data.load_meta(bin_dir)["train_tokens"]


def test_config_fineweb_is_gpt2_124m_on_half_a_million_tokens_a_step(shard_dir, monkeypatch):
    config = load_config("fineweb", TrainConfig)
    assert config.data_dir == "data/fineweb10B" and config.tokens_per_step == 524_288
    assert 9.8e9 < config.max_steps * config.tokens_per_step < 1e10  # one pass of FineWeb10B
    assert (config.model.n_layer, config.model.n_embd, config.model.block_size) == (12, 768, 1024)
    # its vocabulary is the shards' (GPT-2's BPE) padded as with_data_vocab pads it
    unset = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=0))
    assert with_data_vocab(unset, data.load_meta(shard_dir)).model.vocab_size == \
        config.model.vocab_size == 50304
    # before the download: one line that says how to get the shards
    monkeypatch.chdir(shard_dir.parent)
    with pytest.raises(UserError, match=r"^data/fineweb10B does not exist: run `hf download "
                       r"kjj0/fineweb10B-gpt2 --repo-type dataset --local-dir data/fineweb10B`"):
        data.load_meta(config.data_dir)


# ---------------------------------------------------------------------------------------------
# Training on them


def test_a_run_on_shards_is_the_run_on_the_same_tokens_prepared(straight, bin_dir, tmp_path):
    rundir, weights = straight
    prepared = params_of(train.train(config_on(bin_dir, max_steps=8), tmp_path / "prepared"))
    assert_same_weights(weights, prepared)
    assert eval_lines(rundir) == eval_lines(tmp_path / "prepared")  # train and val losses too
    assert len(eval_lines(rundir)) == 2


def test_a_run_on_a_glob_of_them_is_the_same_run(straight, shard_dir, tmp_path):
    rundir, weights = straight
    glob_run = train.train(config_on(f"{shard_dir}/fineweb_*.bin", max_steps=8), tmp_path / "g")
    assert_same_weights(weights, params_of(glob_run))
    assert eval_lines(rundir) == eval_lines(tmp_path / "g")


def test_a_resume_on_shards_equals_the_run_straight_through(straight, shard_dir, tmp_path):
    _, weights = straight
    train.train(config_on(shard_dir, max_steps=4), tmp_path / "resumed")
    resumed = train.train(config_on(shard_dir, max_steps=8), tmp_path / "resumed")
    assert "resuming at step 4/8" in (tmp_path / "resumed" / "log.txt").read_text()
    assert_same_weights(weights, params_of(resumed))


def test_eval_py_scores_the_runs_shards_as_the_prepared_tokens(straight, bin_dir, capsys):
    rundir, _ = straight
    for split in ("val", "train"):
        on_shards = eval_py.main([f"--rundir={rundir}", f"--split={split}"])["loss"]
        prepared = eval_py.main([f"--rundir={rundir}", f"--data_dir={bin_dir}",
                                 f"--split={split}"])["loss"]
        same = ("loss", "perplexity", "tokens", "bytes", "bits_per_byte")
        assert {k: on_shards[k] for k in same} == {k: prepared[k] for k in same}
        assert on_shards["tokens"] == (VAL_SIZE if split == "val" else sum(TRAIN_SIZES)) - 1
    assert "scoring every token of" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Changed under a run, or before its resume


def test_each_shard_written_or_removed_under_a_run_is_noticed(shard_dir, tmp_path):
    folder = shutil.copytree(shard_dir, tmp_path / "fineweb10B")
    stamps = data.file_stamps(folder)
    assert len(stamps) == 4 and data.changed_since(folder, stamps) is None
    for path in sorted(folder.iterdir()):  # every shard, train and val, is watched
        os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))
        assert data.changed_since(folder, stamps) == \
            f"{os.path.normpath(path)} was written (its size or time changed)"
        stamps = data.file_stamps(folder)
    last = folder / "fineweb_train_000003.bin"
    last.unlink()
    assert data.changed_since(folder, stamps) == f"{os.path.normpath(last)} was removed"


def test_a_resume_on_shards_changed_added_or_swapped_is_refused_and_writes_nothing(
        shard_dir, bin_dir, tokens, tmp_path):
    folder = shutil.copytree(shard_dir, tmp_path / "fineweb10B")
    rundir = tmp_path / "run"
    train.train(config_on(folder, max_steps=2), rundir)
    before = files_in(rundir)

    def refused(data_dir, *words):
        with pytest.raises(UserError) as error:
            train.train(config_on(data_dir, max_steps=4), rundir)
        assert files_in(rundir) == before
        message = str(error.value)
        assert "\n" not in message and "start a new --rundir" in message, message
        for word in words:
            assert word in message, message

    touched = folder / "fineweb_train_000002.bin"
    mtime = os.stat(touched).st_mtime_ns
    os.utime(touched, ns=(0, mtime + 1))  # the same bytes: with no hash, a change all the same
    refused(folder, f"{os.path.normpath(touched)} was written")
    os.utime(touched, ns=(0, mtime))
    write_shard(folder / "fineweb_train_000004.bin", tokens[:500])
    refused(folder, f"{os.path.normpath(folder / 'fineweb_train_000004.bin')} is new")
    refused(bin_dir, "the run read shards", "is a prepared dataset")
    # a glob of exactly the run's shards resumes
    train.train(config_on(f"{folder}/fineweb_*_00000[0-3].bin", max_steps=4), rundir)
    assert "resuming at step 2/4" in (rundir / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------
# Damaged shards and names that match none


def header_of(path, magic=data.SHARD_MAGIC, version=data.SHARD_VERSION, count=None):
    ids = np.fromfile(path, "<u2", offset=1024)
    write_shard(path, ids, magic, version, count)


DAMAGE = {  # what is done to fineweb_train_000002.bin, and what the one line says
    "wrong magic": (lambda p: header_of(p, magic=12345),
                    "is no token shard in llm.c's format (magic 12345, not 20240520)"),
    "llama-3 shard": (lambda p: header_of(p, magic=20240801, version=7),
                      "holds llm.c's llama-3 tokens"),
    "wrong version": (lambda p: header_of(p, version=2), "is version 2 of the shard format"),
    "count above the size": (lambda p: header_of(p, count=3101),
                             "has 7,224 bytes, and its header's 3,101 tokens make 7,226"),
    "count below the size": (lambda p: header_of(p, count=3099),
                             "has 7,224 bytes, and its header's 3,099 tokens make 7,222"),
    "truncated": (lambda p: os.truncate(p, os.stat(p).st_size - 2),
                  "has 7,222 bytes, and its header's 3,100 tokens make 7,224"),
    "shorter than the header": (lambda p: os.truncate(p, 1000),
                                "has 1,000 bytes, less than a shard's 1024-byte header"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_shard_is_refused_naming_it_and_what_to_do(shard_dir, tmp_path, case):
    folder = shutil.copytree(shard_dir, tmp_path / "fineweb10B")
    damage, words = DAMAGE[case]
    shard = folder / "fineweb_train_000002.bin"
    damage(shard)
    for data_dir in (folder, f"{folder}/fineweb_*.bin"):
        with pytest.raises(UserError) as error:
            data.load_meta(data_dir)
        message = str(error.value)
        assert message.startswith(f"{os.path.normpath(shard)} ") and words in message, message
        assert "\n" not in message and ("download it again" in message or "GPT-2 shards" in message)


def test_folders_and_globs_that_name_no_split_or_nothing_are_refused(shard_dir, tmp_path):
    folder = shutil.copytree(shard_dir, tmp_path / "fineweb10B")
    cases = {
        f"{folder}/fineweb_train_*.bin": "has no val shard (a *_val_*.bin file): download one",
        f"{folder}/fineweb_val_*.bin": "has no train shard (a *_train_*.bin file): download one",
        f"{folder}/fineweb_test_*.bin": "matches no file: check the pattern",
        f"{tmp_path}/nowhere/*.bin": "matches no file: check the pattern",
    }
    (folder / "notes.bin").write_bytes(b"")
    cases[f"{folder}/*.bin"] = "notes.bin matches --data_dir="  # neither train nor val
    for data_dir, words in cases.items():
        with pytest.raises(UserError, match=re.escape(words)):
            data.load_meta(data_dir)
    for shard in folder.glob("fineweb_val_*"):
        shard.unlink()
    with pytest.raises(UserError, match=re.escape(f"--data_dir={folder} has no val shard")):
        data.load_meta(folder)


def test_an_id_outside_gpt2s_vocabulary_is_refused_naming_its_shard(shard_dir, tokens, tmp_path):
    folder = shutil.copytree(shard_dir, tmp_path / "fineweb10B")
    ids = train_pieces(tokens)[2].copy()
    ids[7] = 60_000
    write_shard(folder / "fineweb_train_000003.bin", ids)
    stream = data.open_split(folder, "train", data.load_meta(folder))
    stream[:5600]  # the shards before it read as ever
    with pytest.raises(UserError, match=re.escape(
            f"{os.path.normpath(folder / 'fineweb_train_000003.bin')} holds token id 60000, "
            "outside GPT-2's vocabulary of 50257")):
        stream[5590:5610]


def test_launch_on_a_damaged_shard_is_one_line_exit_2_and_no_run_directory(shard_dir, tmp_path,
                                                                          capsys):
    folder = shutil.copytree(shard_dir, tmp_path / "fineweb10B")
    header_of(folder / "fineweb_val_000000.bin", magic=0)
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: launch.main([f"--data_dir={folder}", f"--rundir={tmp_path / 'run'}",
                                     *OVERRIDES]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "fineweb_val_000000.bin is no token shard" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated", "no val shard"])
def test_launch_py_refuses_bad_shards_in_one_line_exit_2(shard_dir, tmp_path, case):
    folder = shutil.copytree(shard_dir, tmp_path / "fineweb10B")
    if case == "truncated":
        os.truncate(folder / "fineweb_train_000001.bin", 1500)
    else:
        (folder / "fineweb_val_000000.bin").unlink()
    result = run([REPO / "launch.py", f"--data_dir={folder}", f"--rundir={tmp_path / 'run'}",
                  *OVERRIDES])
    words = ["fineweb_train_000001.bin has 1,500 bytes", "download it again"] \
        if case == "truncated" else ["has no val shard", "download one"]
    assert_one_line_error(result, *words)
    assert not (tmp_path / "run").exists()
