"""data.py: the on-disk format, load_meta's errors, tokenizers, BatchSampler."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cli import UserError, run_cli
from data import BatchSampler, load_meta, load_tokenizer, open_split, write_dataset

REPO = Path(__file__).resolve().parents[1]


def char_meta(chars="abc"):
    return {"tokenizer": "char", "chars": chars, "vocab_size": len(chars), "source": "test"}


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ---------------------------------------------------------------- format and load_meta

def test_write_then_load(tmp_path):
    meta = write_dataset(tmp_path / "d", [0, 1, 2, 1], [2, 0], char_meta())
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no temps
    assert json.loads((tmp_path / "d" / "meta.json").read_text()) == meta
    assert load_meta(tmp_path / "d", verify_hashes=True) == meta
    assert meta["dtype"] == "uint16" and meta["train_tokens"] == 4 and meta["val_tokens"] == 2
    train = open_split(tmp_path / "d", "train", meta)
    assert train.dtype == np.uint16 and train.tolist() == [0, 1, 2, 1] and len(train) == 4
    assert train[1:3].tolist() == [1, 2] and train[-1] == 1 and not train[:].flags.writeable
    (tmp_path / "plain").write_text("")  # temp files get the usual permissions (umask)
    assert (tmp_path / "d" / "train.bin").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_large_vocab_is_uint32(tmp_path):
    meta = write_dataset(tmp_path, [0, 69_999], [65_536], {"tokenizer": "gpt2", "vocab_size": 70_000, "source": "t"})
    assert meta["dtype"] == "uint32" and (tmp_path / "train.bin").stat().st_size == 8
    assert open_split(tmp_path, "train", load_meta(tmp_path)).tolist() == [0, 69_999]


def test_empty_split_opens_as_empty_array(tmp_path):
    write_dataset(tmp_path, [0, 1], [], char_meta())
    assert open_split(tmp_path, "val", load_meta(tmp_path)).size == 0


def test_rewrite_refuses_a_different_dataset_unless_overwrite(tmp_path):
    write_dataset(tmp_path, [0, 1, 2], [1], char_meta())
    before = snapshot(tmp_path)
    write_dataset(tmp_path, [0, 1, 2], [1], char_meta())  # identical: fine
    assert snapshot(tmp_path) == before
    with pytest.raises(UserError, match="different dataset.*--overwrite"):
        write_dataset(tmp_path, [2, 1, 0], [1], char_meta())
    assert snapshot(tmp_path) == before  # untouched, no temp files left
    meta = write_dataset(tmp_path, [2, 1, 0], [1], char_meta(), overwrite=True)
    assert open_split(tmp_path, "train", load_meta(tmp_path, verify_hashes=True)).tolist() == [2, 1, 0]
    assert meta["train_tokens"] == 3


def test_bins_without_meta_are_not_clobbered(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"someone's data")
    with pytest.raises(UserError, match="no meta.json"):
        write_dataset(tmp_path, [0], [1], char_meta())
    assert snapshot(tmp_path) == {"train.bin": b"someone's data"}


def test_load_meta_names_the_prepare_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"data/shakespeare_char does not exist: run `python prepare_shakespeare.py` first"):
        load_meta("data/shakespeare_char")
    (tmp_path / "data" / "openwebtext").mkdir(parents=True)
    with pytest.raises(UserError, match=r"has no meta.json: run `python prepare_openwebtext.py` first"):
        load_meta("data/openwebtext")
    write_dataset("data/shakespeare", list(range(100)), [5], {"tokenizer": "gpt2", "vocab_size": 50257, "source": "t"})
    with open("data/shakespeare/train.bin", "r+b") as f:
        f.truncate(150)
    with pytest.raises(UserError, match=r"150 bytes but meta.json says 200.*`python prepare_shakespeare.py --tokenizer gpt2 --overwrite`"):
        load_meta("data/shakespeare")
    with pytest.raises(UserError, match=r"prepare_shakespeare.py --out_dir .*elsewhere/shakespeare_char"):
        load_meta(tmp_path / "elsewhere" / "shakespeare_char")
    with pytest.raises(UserError, match=r"mine does not exist: run `python prepare_<dataset>.py --out_dir"):
        load_meta("data/mine")


def test_load_meta_verify_hashes_catches_same_size_corruption(tmp_path):
    write_dataset(tmp_path, [0, 1, 2], [1], char_meta())
    (tmp_path / "val.bin").write_bytes(np.array([2], np.uint16).tobytes())
    load_meta(tmp_path)  # sizes still agree
    with pytest.raises(UserError, match="val.bin does not match its sha256"):
        load_meta(tmp_path, verify_hashes=True)


def test_run_cli_one_line_and_exit_codes(capsys):
    def bad():
        raise UserError("first\nsecond")

    with pytest.raises(SystemExit) as e:
        run_cli(bad)
    assert e.value.code == 2 and capsys.readouterr().err == "error: first second\n"

    interrupted = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); import cli; "
                                  "print('out', end=''); cli.run_cli(lambda: (_ for _ in ()).throw(KeyboardInterrupt))"],
                                 cwd=REPO, capture_output=True, text=True)
    assert (interrupted.returncode, interrupted.stdout, interrupted.stderr) == (130, "out", "")


# ---------------------------------------------------------------- tokenizers

def test_char_tokenizer_round_trip_and_unknown_characters():
    tok = load_tokenizer(char_meta("\n !abc"))
    assert tok.vocab_size == 6 and tok.decode(tok.encode("abc cab!\n")) == "abc cab!\n"
    with pytest.raises(UserError) as e:
        tok.encode("a\u2014bé")
    assert str(e.value) == "prompt has characters not in the vocabulary: 'é', '\u2014'"


def test_gpt2_tokenizer_round_trip():
    tok = load_tokenizer({"tokenizer": "gpt2"})
    text = "Hello, world — naïve café 🙂 <|endoftext|>\n\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 50257 and 50256 not in ids  # encode_ordinary: the special token is text
    assert tok.decode(np.array(ids, np.uint16)) == text


def test_unknown_tokenizer():
    with pytest.raises(UserError, match="unknown tokenizer 'bytes'"):
        load_tokenizer({"tokenizer": "bytes"})


# ---------------------------------------------------------------- BatchSampler

@pytest.fixture
def tokens(tmp_path):
    # token i is i (mod 2^16): a window's first token is its start offset
    meta = write_dataset(tmp_path, np.arange(5000), np.arange(100), {"tokenizer": "gpt2", "vocab_size": 50257, "source": "t"})
    return open_split(tmp_path, "train", meta), open_split(tmp_path, "val", meta)


def test_windows_are_shifted_contiguous_slices(tokens):
    train, _ = tokens
    s = BatchSampler(train, block_size=16, batch_size=8, grad_accum=3, seed=1)
    for step in range(5):
        x, y = s.batch(step)
        assert x.shape == y.shape == (3, 8, 16) and x.dtype == y.dtype == np.int32
        assert (y[..., :-1] == x[..., 1:]).all()
        for start, row_x, row_y in zip(x[..., 0].ravel(), x.reshape(-1, 16), y.reshape(-1, 16)):
            assert 0 <= start <= len(train) - 17
            assert (row_x == train[start : start + 16]).all() and (row_y == train[start + 1 : start + 17]).all()


def test_every_start_offset_is_reachable(tokens):
    train, _ = tokens
    short = train[:19]  # block_size 16 -> windows of 17 -> starts 0, 1, 2
    s = BatchSampler(short, block_size=16, batch_size=4)
    starts = {int(v) for step in range(20) for v in s.batch(step)[0][..., 0].ravel()}
    assert starts == {0, 1, 2}


def test_batches_are_a_function_of_seed_and_step(tokens):
    train, _ = tokens
    a = BatchSampler(train, 16, 4, seed=3)
    first = [next(a) for _ in range(3)]
    state = a.state_dict()
    assert state == {"seed": 3, "step": 3} and json.loads(json.dumps(state)) == state
    rest = [next(a) for _ in range(3)]
    b = BatchSampler(train, 16, 4, seed=0)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(rest, [next(b) for _ in range(3)]):
        assert (xa == xb).all() and (ya == yb).all()
    assert not (first[0][0] == rest[0][0]).all()
    assert not (BatchSampler(train, 16, 4, seed=4).batch(0)[0] == first[0][0]).all()


@pytest.mark.parametrize("count", [2, 4])
def test_processes_together_make_the_one_process_batch(tokens, count):
    train, _ = tokens
    whole = BatchSampler(train, 16, 8, grad_accum=2, seed=5).batch(7)
    parts = [BatchSampler(train, 16, 8, grad_accum=2, seed=5, process_index=p, process_count=count).batch(7)
             for p in range(count)]
    assert parts[0][0].shape == (2, 8 // count, 16)
    for i in range(2):
        assert (np.concatenate([p[i] for p in parts], axis=1) == whole[i]).all()


def test_prefetch_matches_plain_iteration(tokens):
    train, _ = tokens
    plain, pre = BatchSampler(train, 16, 4, grad_accum=2, seed=9), BatchSampler(train, 16, 4, grad_accum=2, seed=9)
    plain.load_state_dict({"seed": 9, "step": 11})
    pre.load_state_dict({"seed": 9, "step": 11})
    before = set(threading.enumerate())
    it = pre.prefetch(depth=3)
    (thread,) = set(threading.enumerate()) - before
    for k in range(1, 8):
        xa, ya = next(plain)
        xb, yb = next(it)
        assert (xa == xb).all() and (ya == yb).all()
        assert pre.state_dict() == plain.state_dict() == {"seed": 9, "step": 11 + k}
    time.sleep(0.1)  # the thread has run ahead; the state must still count consumed batches only
    assert pre.state_dict()["step"] == 18
    it.close()
    thread.join(timeout=2)
    assert not thread.is_alive()


def test_dropping_an_unstarted_prefetch_stops_its_thread(tokens):
    train, _ = tokens
    before = set(threading.enumerate())
    it = BatchSampler(train, 16, 4).prefetch()
    (thread,) = set(threading.enumerate()) - before
    del it
    thread.join(timeout=2)
    assert not thread.is_alive()


def test_prefetch_thread_does_not_hang_exit(tmp_path):
    code = f"""
import sys; sys.path.insert(0, {str(REPO)!r})
import numpy as np
from data import BatchSampler
s = BatchSampler(np.arange(1000, dtype=np.uint16), 8, 4)
it = s.prefetch(2)
next(it)
print("done", s.state_dict()["step"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "done 1\n" and r.stderr == ""


def test_sampler_errors(tokens):
    train, val = tokens
    with pytest.raises(UserError, match=r"block_size 256 is larger than the data \(100 tokens in val.bin\): "
                                        r"lower --model.block_size"):
        BatchSampler(val, 256, 4)
    BatchSampler(val, 99, 4).batch(0)  # exactly one window fits
    with pytest.raises(UserError, match="block_size 100 is larger"):
        BatchSampler(val, 100, 4)


def test_prefetch_passes_errors_to_the_consumer(tokens):
    train, _ = tokens
    s = BatchSampler(train, 16, 4)
    s.tokens = None  # breaks batch() inside the thread
    before = set(threading.enumerate())
    it = s.prefetch()
    with pytest.raises(TypeError):
        next(it)
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=2)
        assert not thread.is_alive()
    assert s.state_dict()["step"] == 0


@pytest.mark.parametrize("example_length", [None, 4])
def test_every_window_and_every_whole_example_can_be_drawn(example_length):
    # 12 tokens, block_size 3: the windows of 4 tokens start at 0..8, the examples of 4 at 0, 4, 8.
    # The first token of each row is its start: over 20 batches of 64 rows every start shows up.
    sampler = BatchSampler(np.arange(12, dtype=np.uint16), 3, 64, example_length=example_length)
    starts = set()
    for step in range(20):
        x, y = sampler.batch(step)
        starts |= set(x[0, :, 0].tolist())
        np.testing.assert_array_equal(y, x + 1)  # each row is one contiguous window
    assert starts == ({0, 4, 8} if example_length else set(range(9)))


def test_a_split_cut_short_after_it_was_opened_is_one_line_not_short_batches(tmp_path):
    meta = write_dataset(tmp_path / "d", list(range(3)) * 100, [2, 0], char_meta())
    tokens = open_split(tmp_path / "d", "train", meta)
    os.truncate(tmp_path / "d" / "train.bin", 100 * tokens.dtype.itemsize)
    with pytest.raises(UserError, match="train.bin changed under this job"):
        tokens[50:250]
