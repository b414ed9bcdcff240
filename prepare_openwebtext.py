"""OpenWebText (or local .txt/.jsonl/.parquet files) -> GPT-2 BPE train.bin, val.bin, meta.json.

    python prepare_openwebtext.py                       # Hugging Face openwebtext: needs `datasets`, network
    python prepare_openwebtext.py --input corpus/ --out_dir data/corpus     # local files, offline

--input takes a .txt file (one document), a .jsonl file (a "text" field per line), a .parquet
file (a "text" column) or a directory of them, read in sorted order. Every document is encoded
with GPT-2 BPE and followed by <|endoftext|> (50256). Document i goes to val when a hash of
(--seed, i) falls below --val_fraction: the split depends on neither --num_proc nor chunking,
and at least one document is val when there are two or more.

It streams: documents are read in order, tokenized in chunks by --num_proc worker processes, and
appended to temp files, so memory stays flat whatever the corpus size. The finished files
replace the old ones only at the end (meta.json last): an interrupted run leaves no dataset.
"""

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from itertools import chain, islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cli import ArgumentParser, UserError, run_cli
from data import DatasetWriter, GPT2Tokenizer, existing_dataset, read_text

HF_DATASET = "Skylion007/openwebtext"  # nanoGPT's "openwebtext": 8,013,769 documents
SUFFIXES = (".txt", ".jsonl", ".parquet")
EOT = 50256  # <|endoftext|>, the document separator GPT-2 was trained with


# ---------------------------------------------------------------- reading documents

def local_files(path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(f"{path} is not a .txt, .jsonl or .parquet file (or a directory of them)")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{path} has no .txt, .jsonl or .parquet files")
    return files


def read_jsonl(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except ValueError:
                    raise UserError(f"{path}:{lineno} is not valid JSON")
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    raise UserError(f'{path}:{lineno} has no "text" string')
                yield doc["text"]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason})")


def read_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        schema = f.schema_arrow
        if "text" not in schema.names or not (pa.types.is_string(t := schema.field("text").type)
                                              or pa.types.is_large_string(t)):
            raise UserError(f'{path} has no "text" column of strings')
        for batch in f.iter_batches(batch_size=1024, columns=["text"]):  # one row group slice at a time
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    except pa.ArrowException as e:
        raise UserError(f"{path} is not a readable parquet file ({e})")


def local_docs(files: list[Path]):
    for path in files:
        if path.suffix == ".txt":
            yield read_text(path)
        else:
            yield from (read_jsonl if path.suffix == ".jsonl" else read_parquet)(path)


def hf_docs():
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError("the `datasets` package is not installed: `pip install datasets`, "
                        "or pass --input with local .txt/.jsonl/.parquet files")

    def stream():  # streaming: no 50 GB cache on disk, and a fixed order, so the output is deterministic
        try:
            for row in load_dataset(HF_DATASET, split="train", streaming=True):
                yield row["text"]
        except Exception as e:
            raise UserError(f"cannot stream {HF_DATASET} from Hugging Face ({type(e).__name__}: {e}): "
                            "check the network, or pass --input with local files")

    return stream()


# ---------------------------------------------------------------- tokenizing in workers

_enc = None


def tokenize(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (their tokens, each document followed by EOT, as uint16; per-document lengths)."""
    global _enc
    if _enc is None:  # once per worker; loading in an initializer would respawn forever on failure
        _enc = GPT2Tokenizer().enc
    # not encode_ordinary_batch: its thread pool made this ~30% slower (BENCHMARKS.md), and the
    # parallelism comes from the processes anyway
    ids = [_enc.encode_ordinary(d) for d in docs]
    for x in ids:
        x.append(EOT)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    return np.fromiter(chain.from_iterable(ids), np.uint16, count=lengths.sum()), lengths


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def tokenized(docs, num_proc: int, chunk_docs: int):
    """tokenize() of successive chunks of docs, in order, computed by num_proc processes."""
    it = iter(docs)
    chunks = iter(lambda: list(islice(it, chunk_docs)), [])
    if num_proc == 1:
        yield from map(tokenize, chunks)
        return
    # spawn, not fork: safe even when the caller has threads (tests import jax)
    with mp.get_context("spawn").Pool(num_proc, initializer=_ignore_sigint) as pool:
        pending = deque()  # at most 2 chunks per worker in flight: memory stays bounded
        for chunk in chunks:
            pending.append(pool.apply_async(tokenize, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def in_val(index: int, seed: int, fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2**64


# ---------------------------------------------------------------- main

def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="a .txt/.jsonl/.parquet file or a directory of them (default: Hugging Face)")
    p.add_argument("--out_dir", default="data/openwebtext")
    p.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer worker processes")
    p.add_argument("--val_fraction", type=float, default=0.0005)
    p.add_argument("--seed", type=int, default=2357)
    p.add_argument("--chunk_docs", type=int, default=256, help="documents per worker task")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in --out_dir")
    args = p.parse_args(argv)
    if args.num_proc < 1 or args.chunk_docs < 1 or not 0 <= args.val_fraction < 1:
        raise UserError("need --num_proc >= 1, --chunk_docs >= 1 and 0 <= --val_fraction < 1")

    if args.input:
        files = local_files(args.input)
        docs, source = local_docs(files), str(Path(args.input).resolve())
    else:
        docs, source = hf_docs(), f"huggingface:{HF_DATASET}"
    settings = {"source": source, "seed": args.seed, "val_fraction": args.val_fraction}
    # a dataset from other settings would be refused at the end: say so before hours of work
    existing_dataset(args.out_dir, args.overwrite, expect=settings)
    GPT2Tokenizer()  # fail fast if the BPE files can't be had, and fill tiktoken's cache for the workers

    n_docs, n_val, last_train_len, t0 = 0, 0, 0, time.time()
    with DatasetWriter(args.out_dir, vocab_size=50257) as w:
        with tqdm(unit="doc", unit_scale=True, disable=None, desc="tokenizing") as bar:  # a bar on a terminal
            for tokens, lengths in tokenized(docs, args.num_proc, args.chunk_docs):
                val = np.array([in_val(n_docs + i, args.seed, args.val_fraction) for i in range(len(lengths))])
                val_tokens = np.repeat(val, lengths)
                w.append("train", tokens[~val_tokens])
                w.append("val", tokens[val_tokens])
                if not val.all():
                    last_train_len = int(lengths[~val][-1])
                n_docs, n_val = n_docs + len(lengths), n_val + int(val.sum())
                bar.update(len(lengths))
                tokens_per_s = (w.tokens["train"] + w.tokens["val"]) / (time.time() - t0)
                bar.set_postfix_str(f"{tokens_per_s / 1e6:.2f}M tok/s", refresh=False)
        if n_docs < 2:  # a train and a val split need a document each (as prepare_shakespeare.py)
            raise UserError(f"{source} holds {'no documents' if not n_docs else 'one document'}: "
                            "need at least two, one for the val split")
        if n_val == n_docs:
            raise UserError(f"all {n_docs} documents fell in val: lower --val_fraction")
        if n_val == 0:  # an empty val split would only fail later, at eval
            w.move_tail(last_train_len)  # the last train document is the tail of train.bin
            n_val = 1
        meta = w.commit({"tokenizer": "gpt2", **settings, "documents": n_docs, "val_documents": n_val},
                        args.overwrite)
    dt = time.time() - t0
    total = meta["train_tokens"] + meta["val_tokens"]
    print(f"{args.out_dir}: {n_docs:,} documents ({n_val:,} val), {meta['train_tokens']:,} train / "
          f"{meta['val_tokens']:,} val tokens in {dt:.1f}s ({total / dt:,.0f} tokens/s, {args.num_proc} processes)")
    return meta


if __name__ == "__main__":
    run_cli(main)
