"""prepare_shakespeare.py and prepare_openwebtext.py on real local files (no network)."""

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import prepare_openwebtext
import prepare_shakespeare
from data import load_meta, load_tokenizer, open_split

REPO = Path(__file__).resolve().parents[1]
EOT = 50256


def run(script, *args):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ---------------------------------------------------------------- shakespeare

@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory, shakespeare_input):
    out = tmp_path_factory.mktemp("shakespeare")
    for tok in ("char", "gpt2"):
        prepare_shakespeare.main(["--input", str(shakespeare_input), "--tokenizer", tok, "--out_dir", str(out / tok)])
    return out


def test_shakespeare_char(shakespeare, shakespeare_input):
    meta = load_meta(shakespeare / "char", verify_hashes=True)
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("char", 65, "uint16")
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    assert meta["chars"] == "".join(sorted(set(shakespeare_input.read_text())))
    text, tok = shakespeare_input.read_text(), load_tokenizer(meta)
    assert tok.decode(open_split(shakespeare / "char", "val", meta)) == text[1_003_854:]
    assert tok.decode(tok.encode(text)) == text


def test_shakespeare_gpt2(shakespeare, shakespeare_input):
    meta = load_meta(shakespeare / "gpt2", verify_hashes=True)
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)
    text, tok = shakespeare_input.read_text(), load_tokenizer(meta)
    assert tok.decode(open_split(shakespeare / "gpt2", "train", meta)) == text[:1_003_854]
    assert tok.decode(tok.encode(text)) == text


def test_shakespeare_cli_prints_counts_and_rerun_is_up_to_date(shakespeare, shakespeare_input, tmp_path):
    shutil.copytree(shakespeare / "char", tmp_path / "char")
    before = snapshot(tmp_path / "char")
    r = run("prepare_shakespeare.py", "--input", shakespeare_input, "--out_dir", tmp_path / "char")
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout and "vocab 65, 1,003,854 train / 111,540 val tokens" in r.stdout
    assert snapshot(tmp_path / "char") == before


def test_shakespeare_any_text_and_overwrite(shakespeare, tmp_path):
    shutil.copytree(shakespeare / "char", tmp_path / "out")
    (tmp_path / "in.txt").write_text("to be or not to be, ünïcode\n" * 10)
    assert run("prepare_shakespeare.py", "--input", tmp_path / "in.txt", "--out_dir", tmp_path / "out").returncode == 2
    r = run("prepare_shakespeare.py", "--input", tmp_path / "in.txt", "--out_dir", tmp_path / "out", "--overwrite")
    assert r.returncode == 0, r.stderr
    meta = load_meta(tmp_path / "out", verify_hashes=True)
    assert meta["vocab_size"] == len(set("to be or not to be, ünïcode\n")) and meta["train_tokens"] == 252


# ---------------------------------------------------------------- openwebtext on local files

def make_docs(n=300, seed=0):
    """Unique documents (each one's tokens identify it) with unicode and near-empty ones."""
    r = random.Random(seed)
    words = "the of and to in a is that for it as was with be by on not he I this are or his".split()
    docs = [f"doc {i}. " + " ".join(r.choices(words, k=r.randint(0, 200))) for i in range(n)]
    docs[1], docs[2], docs[3], docs[4] = "", " ", "\n", "\t\t"
    docs[5] = "naïve café — 日本語 🙂 \ud800 <|endoftext|> literal"  # lone surrogate, special-token text
    for i in range(10, n, 7):
        docs[i] += "\n\nŻółć Ελληνικά עברית"
    return docs


def write_corpus(root: Path, docs):
    """docs[:100] in a.jsonl, the next 50 as sub/*.txt, the rest in z.parquet: sorted order = doc order."""
    (root / "sub").mkdir(parents=True)
    with open(root / "a.jsonl", "w") as f:
        for i, d in enumerate(docs[:100]):
            f.write(json.dumps({"text": d, "id": i}) + "\n" + ("\n" if i == 50 else ""))  # a blank line is skipped
    for i, d in enumerate(docs[100:150]):
        (root / "sub" / f"t{i:03d}.txt").write_text(d, encoding="utf-8")
    pq.write_table(pa.table({"text": docs[150:], "n": list(range(len(docs) - 150))}), root / "z.parquet",
                   row_group_size=40)
    (root / "notes.md").write_text("not a corpus file: ignored")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_docs()
    return write_corpus(tmp_path_factory.mktemp("corpus"), docs), docs


def split_docs(tokens):
    """A .bin's tokens -> one tuple per document (every document ends in EOT)."""
    tokens = np.asarray(tokens)
    assert tokens.size == 0 or tokens[-1] == EOT
    return [tuple(d) for d in np.split(np.asarray(tokens, np.int64), np.flatnonzero(tokens == EOT) + 1)[:-1]]


def check_split(out, docs):
    meta = load_meta(out, verify_hashes=True)
    enc = tiktoken.get_encoding("gpt2")
    want = [tuple(enc.encode_ordinary(d)) + (EOT,) for d in docs]
    assert len(set(want)) == len(docs)
    assert meta["train_tokens"] + meta["val_tokens"] == sum(map(len, want))
    for s in ("train", "val"):
        assert meta[f"{s}_sha256"] == hashlib.sha256((out / f"{s}.bin").read_bytes()).hexdigest()
    index = {d: i for i, d in enumerate(want)}
    train = [index[d] for d in split_docs(open_split(out, "train", meta))]
    val = [index[d] for d in split_docs(open_split(out, "val", meta))]
    # each split holds its documents whole and in corpus order; together, every document once
    assert train == sorted(train) and val == sorted(val) and sorted(train + val) == list(range(len(docs)))
    assert meta["documents"] == len(docs) and meta["val_documents"] == len(val) >= 1
    return val


def test_openwebtext_local_files(corpus, tmp_path):
    root, docs = corpus
    args = ["--input", str(root), "--num_proc", "1", "--chunk_docs", "16"]
    prepare_openwebtext.main(args + ["--out_dir", str(tmp_path / "a")])
    assert check_split(tmp_path / "a", docs) == [len(docs) - 1]  # val_fraction 0.0005: the guaranteed one
    prepare_openwebtext.main(args + ["--out_dir", str(tmp_path / "b"), "--chunk_docs", "1000"])
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")  # deterministic, chunking doesn't matter


def test_openwebtext_two_processes_equal_one(corpus, tmp_path):
    root, docs = corpus
    outs = []
    for n in (1, 2):
        r = run("prepare_openwebtext.py", "--input", root, "--out_dir", tmp_path / str(n), "--num_proc", n,
                "--chunk_docs", 8, "--val_fraction", 0.2)
        assert r.returncode == 0, r.stderr
        assert f"{len(docs)} documents" in r.stdout and "tokens/s" in r.stdout
        outs.append(snapshot(tmp_path / str(n)))
    assert outs[0] == outs[1]
    val = check_split(tmp_path / "2", docs)
    assert 30 < len(val) < 90  # ~20% of 300


def test_openwebtext_seed_changes_split(corpus, tmp_path):
    root, docs = corpus
    vals = []
    for seed in (1, 2):
        prepare_openwebtext.main(["--input", str(root), "--out_dir", str(tmp_path / str(seed)), "--num_proc", "1",
                                  "--val_fraction", "0.1", "--seed", str(seed)])
        vals.append(check_split(tmp_path / str(seed), docs))
    assert vals[0] != vals[1]


def test_openwebtext_single_file_and_tiny_corpora(corpus, tmp_path):
    root, docs = corpus
    prepare_openwebtext.main(["--input", str(root / "z.parquet"), "--out_dir", str(tmp_path / "p"),
                              "--num_proc", "1", "--val_fraction", "0"])
    assert check_split(tmp_path / "p", docs[150:]) == [len(docs) - 151]  # val_fraction 0 still gets one
    (tmp_path / "one.txt").write_text("just one document")  # can't be split: nobody could train
    with pytest.raises(prepare_openwebtext.UserError, match="holds one document: need at least two"):
        prepare_openwebtext.main(["--input", str(tmp_path / "one.txt"), "--out_dir", str(tmp_path / "o"),
                                  "--num_proc", "1"])
    (tmp_path / "two.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    meta = prepare_openwebtext.main(["--input", str(tmp_path / "two.jsonl"), "--out_dir", str(tmp_path / "t"),
                                     "--num_proc", "1", "--val_fraction", "0"])
    assert (meta["train_tokens"], meta["val_tokens"], meta["val_documents"]) == (2, 2, 1)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing clobbered

# --overwrite where the input itself is bad: a failing run must not clobber even a dataset it may replace
BAD = {
    "missing file": ("prepare_shakespeare.py", ["--input", "{tmp}/nope.txt", "--overwrite"], "nope.txt does not exist"),
    "empty file": ("prepare_shakespeare.py", ["--input", "{tmp}/empty.txt", "--overwrite"], "empty.txt is empty"),
    "non-UTF-8": ("prepare_shakespeare.py", ["--input", "{tmp}/latin1.txt", "--overwrite"],
                  "latin1.txt is not UTF-8 text"),
    "different dataset": ("prepare_shakespeare.py", ["--input", "{tmp}/other.txt"], "already holds a different dataset"),
    "different tokenizer": ("prepare_shakespeare.py", ["--input", "{shakespeare}", "--tokenizer", "gpt2"],
                            "already holds a different dataset"),
    "no usable files": ("prepare_openwebtext.py", ["--input", "{tmp}/emptydir", "--overwrite"],
                        "has no .txt, .jsonl or .parquet files"),
    "owt non-UTF-8": ("prepare_openwebtext.py", ["--input", "{tmp}/mixed", "--overwrite"], "latin1.txt is not UTF-8 text"),
    "owt bad jsonl": ("prepare_openwebtext.py", ["--input", "{tmp}/bad.jsonl", "--overwrite"],
                      'bad.jsonl:2 has no "text" string'),
    "owt not parquet": ("prepare_openwebtext.py", ["--input", "{tmp}/fake.parquet", "--overwrite"],
                        "fake.parquet is not a readable parquet file"),
    "owt different dataset": ("prepare_openwebtext.py", ["--input", "{tmp}/other.txt"], "already holds a different dataset"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, shakespeare, shakespeare_input, tmp_path):
    script, args, message = BAD[case]
    good = tmp_path / "good"
    shutil.copytree(shakespeare / "char", good)
    before = snapshot(good)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("naïve café\n".encode("latin-1"))
    (tmp_path / "other.txt").write_text("some other text\n" * 5)
    (tmp_path / "emptydir" / "sub").mkdir(parents=True)
    (tmp_path / "emptydir" / "readme.md").write_text("no corpus here")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (tmp_path / "fake.parquet").write_text("not parquet")
    (tmp_path / "mixed").mkdir()  # good documents first, so the bad one fails mid-stream
    (tmp_path / "mixed" / "a.txt").write_text("fine " * 1000)
    (tmp_path / "mixed" / "latin1.txt").write_bytes("naïve café\n".encode("latin-1"))
    args = [a.format(tmp=tmp_path, shakespeare=shakespeare_input) for a in args]
    r = run(script, *args, "--out_dir", good)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(good) == before  # byte-identical, and no temp files left behind


def test_openwebtext_interrupted_run_leaves_the_old_dataset(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    out = tmp_path / "out"
    prepare_openwebtext.main(["--input", str(root / "a.jsonl"), "--out_dir", str(out), "--num_proc", "1"])
    before = snapshot(out)
    calls, tokenize = [], prepare_openwebtext.tokenize

    def interrupted(docs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C midway, after some tokens were written
        return tokenize(docs)

    monkeypatch.setattr(prepare_openwebtext, "tokenize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_openwebtext.main(["--input", str(root), "--out_dir", str(out), "--num_proc", "1",
                                  "--chunk_docs", "16", "--overwrite"])
    assert snapshot(out) == before  # no temp files, nothing replaced


def test_openwebtext_without_datasets_or_documents(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails, as when not installed
    with pytest.raises(prepare_openwebtext.UserError, match="`datasets` package is not installed.*--input"):
        prepare_openwebtext.main(["--out_dir", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(prepare_openwebtext.UserError, match="blank.jsonl holds no documents"):
        prepare_openwebtext.main(["--input", str(tmp_path / "blank.jsonl"), "--out_dir", str(tmp_path / "o")])
    assert list((tmp_path / "o").iterdir()) == []


def test_shakespeare_download_failure_suggests_input(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_shakespeare, "URL", "http://127.0.0.1:9/input.txt")  # refused locally: no network
    with pytest.raises(prepare_shakespeare.UserError, match=r"cannot download .*pass --input PATH"):
        prepare_shakespeare.main(["--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_openwebtext_refuses_other_settings_before_tokenizing(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    out = tmp_path / "out"
    prepare_openwebtext.main(["--input", str(root / "a.jsonl"), "--out_dir", str(out), "--num_proc", "1"])

    def tokenize(docs):
        raise AssertionError("tokenized before checking --out_dir")

    monkeypatch.setattr(prepare_openwebtext, "tokenize", tokenize)
    with pytest.raises(prepare_openwebtext.UserError, match="already holds a different dataset"):
        prepare_openwebtext.main(["--input", str(root / "a.jsonl"), "--out_dir", str(out), "--num_proc", "1",
                                  "--seed", "7"])
