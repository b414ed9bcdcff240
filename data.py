"""The on-disk token format, the tokenizers and the batch sampler.

A dataset is a directory `data/<name>/` with three files:
  train.bin, val.bin  flat token ids, uint16 (uint32 when vocab_size > 65536), no header, so
                      a slice of a split is one read of its bytes (TokenFile)
  meta.json           {"tokenizer": "char"|"gpt2"|"pixels", "chars" (char only), "vocab_size",
                      "dtype", "train_tokens", "val_tokens", "train_sha256", "val_sha256",
                      "source", ...}
meta.json is written last, so a directory that has one is complete. JSON only, never pickle.

A dataset of fixed-length examples (prepare_addition.py, prepare_digits.py) says so in meta.json:
  example_length      the splits are whole examples of this many tokens back to back; every
                      batch row is exactly one example (block_size = example_length - 1)
  loss_mask           0/1 for each of an example's example_length - 1 targets: 0 turns that
                      target into IGNORE, which the loss skips (e.g. the question of a problem)
  completion_eval     {"prompt_length": P}: at each eval_interval, each val example is decoded
                      greedily from its first P tokens and scored by exact match (train.py)
prepare_*.py write datasets with DatasetWriter; training reads them with load_meta, open_split
and BatchSampler; sampling encodes prompts with load_tokenizer.

A data_dir may instead name FineWeb shards as llm.c and modded-nanogpt download them (a folder of
them without a meta.json, or a glob): each file a header of 256 little-endian int32 (magic
20240520, version 1, the token count), then that many uint16 GPT-2 ids. Files named *_train_*
are the train split, one stream in sorted order, *_val_* the val split; they are read in place,
and their meta is GPT-2's BPE (shard_meta).
"""

import bisect
import glob
import hashlib
import json
import os
import queue
import threading
import weakref
from pathlib import Path

import numpy as np

from cli import UserError

SPLITS = ("train", "val")
TOKENIZERS = ("char", "gpt2", "pixels")  # pixels: prepare_digits.py's grey levels, no text
META_ORDER = ("tokenizer", "chars", "vocab_size", "dtype", "train_tokens", "val_tokens",
              "train_sha256", "val_sha256", "source")
IDENTITY_KEYS = ("tokenizer", "chars", "vocab_size", "dtype", "train_sha256", "val_sha256")  # not "source"
TOKENIZER_KEYS = ("tokenizer", "chars", "vocab_size", "digits")  # what a token id means
# the command that makes each well-known dataset, so an error can say what to run
PREPARE_COMMANDS = {
    "shakespeare_char": "python prepare_shakespeare.py",
    "shakespeare": "python prepare_shakespeare.py --tokenizer gpt2",
    "openwebtext": "python prepare_openwebtext.py",
    "addition": "python prepare_addition.py",
    "digits": "python prepare_digits.py",
}
FINEWEB_DOWNLOAD = "hf download kjj0/fineweb10B-gpt2 --repo-type dataset --local-dir {}"
IGNORE = -1  # a target no loss counts (as nanoGPT's ignore_index=-1): model.loss_fn skips it


def prepare_command(data_dir) -> str:
    name = Path(data_dir).name
    if name == "fineweb10B":  # shards are downloaded, not prepared (README, FineWeb shards)
        return FINEWEB_DOWNLOAD.format(data_dir)
    if name not in PREPARE_COMMANDS:
        return f"python prepare_<dataset>.py --out_dir {data_dir}"
    cmd = PREPARE_COMMANDS[name]
    return cmd if os.path.normpath(data_dir) == os.path.join("data", name) else f"{cmd} --out_dir {data_dir}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)  # ids are < vocab_size


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def file_stamps(data_dir) -> dict[str, list[int]]:
    """Each file the data is read from, [size, modification time in ns] ([-1, -1] when it is
    gone): a change to either says that it was written. Keys: a split ("train", "val") for a
    prepared dataset, each shard's path for shards."""
    def stamp(path) -> list[int]:
        try:
            return [(st := os.stat(path)).st_size, st.st_mtime_ns]
        except FileNotFoundError:
            return [-1, -1]

    if is_shards(data_dir):
        return {path: stamp(path) for path in listed_shards(data_dir)}
    return {s: stamp(Path(data_dir) / f"{s}.bin") for s in SPLITS}


def changed_since(data_dir, stamps: dict) -> str | None:
    """Which file of stamps (file_stamps) was written or removed since, if any (files that have
    appeared since are not read by the job that took stamps: see shards_changed_since)."""
    now = file_stamps(data_dir)
    changed = [key for key in stamps if now.get(key, [-1, -1]) != list(stamps[key])]
    if not changed:
        return None
    how = "removed" if now.get(changed[0], [-1])[0] < 0 else "written (its size or time changed)"
    path = Path(data_dir) / f"{changed[0]}.bin" if changed[0] in SPLITS else changed[0]
    return f"{path} was {how}"


def shards_changed_since(data_dir, stamps: dict) -> str | None:
    """What differs between the files of stamps (file_stamps, as a run recorded them) and
    data_dir's files now, when either are shards: shards carry no hash that could tell the same
    tokens from others, so any change is one. None for two prepared datasets (their hashes in
    meta.json say whether they differ: checkpoints.check_rundir)."""
    now = file_stamps(data_dir)
    if set(stamps) | set(now) <= set(SPLITS):
        return None
    if set(stamps) <= set(SPLITS) or set(now) <= set(SPLITS):
        was, is_ = ("a prepared dataset", "shards") if set(stamps) <= set(SPLITS) else \
                   ("shards", "a prepared dataset")
        return f"the run read {was}, and {data_dir} is {is_}"
    if problem := changed_since(data_dir, stamps):
        return problem
    added = sorted(set(now) - set(stamps))
    if not added:
        return None
    return (f"{added[0]} is new ({len(added)} shard(s) more than the {len(stamps)} the run "
            "read; a glob can name exactly the run's)")


def read_text(path) -> str:
    """A local UTF-8 text file; a missing file or bad bytes is a UserError that names it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})")


# ---------------------------------------------------------------- writing

def _read_meta(data_dir: Path, fix: str) -> dict:
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{data_dir}/meta.json is unreadable ({e}): {fix}")
    if not isinstance(meta, dict):
        raise UserError(f"{data_dir}/meta.json is not a JSON object: {fix}")
    return meta


def existing_dataset(out_dir, overwrite: bool, expect: dict | None = None) -> dict | None:
    """The meta of the dataset in out_dir; None if there is none or overwrite is set. Refuses one
    whose meta disagrees with `expect`, and .bin files without a meta.json (maybe not ours)."""
    out_dir = Path(out_dir)
    if overwrite or not out_dir.is_dir():
        return None
    if (out_dir / "meta.json").exists():
        old = _read_meta(out_dir, "pass --overwrite to replace it")
        if any(old.get(k) != v for k, v in (expect or {}).items()):
            raise UserError(f"{out_dir} already holds a different dataset ({old.get('tokenizer')} tokens of "
                            f"{old.get('source')}): pass --overwrite to replace it, or choose another --out_dir")
        return old
    if any((out_dir / f"{s}.bin").exists() for s in SPLITS):
        raise UserError(f"{out_dir} has .bin files but no meta.json (an interrupted run?): "
                        "pass --overwrite to replace them, or choose another --out_dir")
    return None


class DatasetWriter:
    """Appends train/val tokens to hidden temp files in out_dir; commit() swaps them in.

    Until commit() nothing a reader looks at changes, so an error or Ctrl-C midway leaves the old
    dataset intact (close() deletes the temp files). Appending as tokens come lets a streaming
    prepare script run in bounded memory.
    """

    def __init__(self, out_dir, vocab_size: int):
        self.out_dir, self.vocab_size, self.dtype = Path(out_dir), vocab_size, token_dtype(vocab_size)
        self.paths = {s: self.out_dir / f".{s}.bin.{os.getpid()}.tmp" for s in SPLITS}
        self.files, self.tokens = {}, {s: 0 for s in SPLITS}
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for s in SPLITS:
                self.files[s] = open(self.paths[s], "wb")
        except OSError as e:
            self.close()
            raise UserError(f"cannot write to {self.out_dir}: {e.strerror or e}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def append(self, split: str, ids) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids outside [0, {self.vocab_size})")  # a bug, not bad input
        self.files[split].write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens[split] += ids.size

    def move_tail(self, n: int, src: str = "train", dst: str = "val") -> None:
        """Move the last n tokens of src to the end of dst (a streaming script's last document)."""
        keep, f = self.tokens[src] - n, self.files[src]
        f.flush()
        tail = np.fromfile(self.paths[src], dtype=self.dtype, offset=keep * self.dtype.itemsize)
        f.truncate(keep * self.dtype.itemsize)
        f.seek(0, os.SEEK_END)
        self.tokens[src] = keep
        self.append(dst, tail)

    def commit(self, meta_extra: dict, overwrite: bool = False) -> dict:
        """Write meta.json and swap the new files in, unless out_dir holds a different dataset
        (same tokenizer and hashes: rewritten identically) and overwrite is not set."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename that makes it visible
            f.close()
        meta = {**meta_extra, "vocab_size": self.vocab_size, "dtype": self.dtype.name}
        meta |= {f"{s}_tokens": self.tokens[s] for s in SPLITS}
        meta |= {f"{s}_sha256": sha256_file(self.paths[s]) for s in SPLITS}
        meta = {k: meta[k] for k in META_ORDER if k in meta} | meta  # documented keys first
        if existing_dataset(self.out_dir, overwrite, expect={k: meta.get(k) for k in IDENTITY_KEYS}):
            print(f"{self.out_dir} already holds this exact dataset: up to date")
        else:
            (self.out_dir / "meta.json").unlink(missing_ok=True)  # incomplete while the .bins change
        for s in SPLITS:
            os.replace(self.paths[s], self.out_dir / f"{s}.bin")
        tmp = self.out_dir / f".meta.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, self.out_dir / "meta.json")  # last: now the directory is a dataset
        return meta

    def close(self) -> None:
        """Delete whatever commit() did not move into place."""
        for s, f in self.files.items():
            f.close()
            self.paths[s].unlink(missing_ok=True)


def write_dataset(out_dir, train_ids, val_ids, meta_extra: dict, overwrite: bool = False) -> dict:
    """Write an in-memory dataset atomically; meta_extra has "tokenizer", "vocab_size", "source"."""
    with DatasetWriter(out_dir, meta_extra["vocab_size"]) as w:
        w.append("train", train_ids)
        w.append("val", val_ids)
        return w.commit(meta_extra, overwrite)


# ---------------------------------------------------------------- reading

def load_meta(data_dir, verify_hashes: bool = False) -> dict:
    """The meta of a complete dataset; anything missing or inconsistent is a UserError naming
    the command that (re)makes it."""
    if is_shards(data_dir):
        return shard_meta(data_dir)
    data_dir = Path(data_dir)
    cmd = prepare_command(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"{data_dir} is a file, not a dataset directory: check --data_dir")
    if not data_dir.is_dir():
        raise UserError(f"{data_dir} does not exist: run `{cmd}` first")
    if not (data_dir / "meta.json").is_file():
        raise UserError(f"{data_dir} has no meta.json: run `{cmd}` first")
    meta = _read_meta(data_dir, f"rerun `{cmd} --overwrite`")
    required = ["tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens"]
    missing = [k for k in required + ["chars"] * (meta.get("tokenizer") == "char") if k not in meta]
    if missing:
        raise UserError(f"{data_dir}/meta.json lacks {', '.join(missing)}: rerun `{cmd} --overwrite`")
    if problem := _meta_value_problem(meta):
        raise UserError(f"{data_dir}/meta.json: {problem}: rerun `{cmd} --overwrite`")
    for s in SPLITS:
        path, size = data_dir / f"{s}.bin", meta[f"{s}_tokens"] * np.dtype(meta["dtype"]).itemsize
        if not path.is_file():
            raise UserError(f"{path} is missing: rerun `{cmd} --overwrite`")
        if path.stat().st_size != size:
            raise UserError(f"{path} has {path.stat().st_size} bytes but meta.json says {size} "
                            f"(truncated, or from another dataset): rerun `{cmd} --overwrite`")
        if verify_hashes and sha256_file(path) != meta.get(f"{s}_sha256"):
            raise UserError(f"{path} does not match its sha256 in meta.json: rerun `{cmd} --overwrite`")
    if problem := _example_layout_problem(meta):
        raise UserError(f"{data_dir}/meta.json: {problem}: rerun `{cmd} --overwrite`")
    return meta


def _meta_value_problem(meta: dict) -> str | None:
    """What is wrong with the types and values of meta's required keys, if anything."""
    is_count = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0  # noqa: E731
    if meta["tokenizer"] not in TOKENIZERS:
        return f"tokenizer {meta['tokenizer']!r} is not one of {', '.join(map(repr, TOKENIZERS))}"
    if not is_count(meta["vocab_size"]) or meta["vocab_size"] < 1:
        return f"vocab_size {meta['vocab_size']!r} is not a positive integer"
    for key in ("train_tokens", "val_tokens"):
        if not is_count(meta[key]):
            return f"{key} {meta[key]!r} is not an integer >= 0"
    # token ids are unsigned integers wide enough for the vocabulary (token_dtype): float16 bytes
    # read as ids would be garbage, and a narrower type cannot hold every id
    wide_enough = [t for t in ("uint16", "uint32") if np.iinfo(t).max >= meta["vocab_size"] - 1]
    if meta["dtype"] not in wide_enough:
        return f"dtype {meta['dtype']!r} is not {' or '.join(map(repr, wide_enough))}"
    if meta["tokenizer"] == "char" and not (isinstance(meta["chars"], str)
                                            and len(meta["chars"]) == meta["vocab_size"]):
        return f"chars is not a string of vocab_size={meta['vocab_size']} characters"
    return None


def _example_layout_problem(meta: dict) -> str | None:
    """What is wrong with meta's example_length, loss_mask and completion_eval, if anything."""
    length = meta.get("example_length")
    for key in ("loss_mask", "completion_eval"):
        if key in meta and length is None:
            return f"{key} needs example_length"
    if length is None:
        return None
    if not isinstance(length, int) or length < 2:
        return f"example_length {length!r} is not an integer >= 2"
    if any(meta[f"{s}_tokens"] % length for s in SPLITS):
        return f"a split is not a whole number of examples of {length} tokens"
    mask = meta.get("loss_mask")
    if mask is not None and (len(mask) != length - 1 or set(mask) - {0, 1} or not any(mask)):
        return f"loss_mask must be {length - 1} zeros and ones, at least one 1"
    prompt = meta.get("completion_eval", {}).get("prompt_length", 1)
    if not isinstance(prompt, int) or not 1 <= prompt < length:
        return f"completion_eval's prompt_length must be an integer in [1, {length})"
    return None


# ---------------------------------------------------------------- FineWeb shards (llm.c's format)

SHARD_HEADER_BYTES = 256 * 4  # 256 little-endian int32: magic, version, token count, zeros
SHARD_MAGIC, SHARD_VERSION, SHARD_DTYPE = 20240520, 1, "uint16"  # llm.c's GPT-2 shards
LLAMA3_SHARD_MAGIC = 20240801  # llm.c's llama-3 shards (version 7, uint32 ids): not GPT-2's BPE
SHARD_FIX = "download it again (README.md, FineWeb shards)"


def is_glob(data_dir) -> bool:
    """A pattern to expand: wildcards in a name that is not there (a folder named run[1] is a
    folder)."""
    return any(c in str(data_dir) for c in "*?[") and not Path(data_dir).exists()


def is_shards(data_dir) -> bool:
    """data_dir names FineWeb shards: a glob, or a folder of *_train_*.bin / *_val_*.bin files
    without a meta.json (one with a meta.json is a prepared dataset)."""
    folder = Path(data_dir)
    return is_glob(data_dir) or (folder.is_dir() and not (folder / "meta.json").exists()
                                 and bool(listed_shards(folder)))


def shard_split(path) -> str | None:
    """"train" or "val" for a shard named *_train_* or *_val_*, else None."""
    return next((s for s in SPLITS if f"_{s}_" in os.path.basename(path)), None)


def listed_shards(data_dir) -> list[str]:
    """The files a glob matches, or a folder's shard files, in sorted order (names are
    zero-padded: fineweb_train_000001.bin ...); not yet checked."""
    if is_glob(data_dir):
        return sorted(os.path.normpath(path) for path in glob.glob(str(data_dir)))
    paths = glob.glob(os.path.join(glob.escape(str(data_dir)), "*.bin"))
    return sorted(os.path.normpath(path) for path in paths if shard_split(path))


def read_shard_header(path) -> int:
    """The number of tokens in a shard, once its header and its size agree that it is whole."""
    try:
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(SHARD_HEADER_BYTES), "<i4")
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}): check --data_dir")
    if size < SHARD_HEADER_BYTES:
        raise UserError(f"{path} has {size:,} bytes, less than a shard's {SHARD_HEADER_BYTES}-byte "
                        f"header (an interrupted download?): {SHARD_FIX}")
    magic, version, count = (int(x) for x in header[:3])
    if magic == LLAMA3_SHARD_MAGIC:
        raise UserError(f"{path} holds llm.c's llama-3 tokens (magic {magic}, uint32 ids), and "
                        f"eqxgpt reads its GPT-2 shards only (magic {SHARD_MAGIC}): point "
                        "--data_dir at GPT-2 shards")
    if magic != SHARD_MAGIC:
        raise UserError(f"{path} is no token shard in llm.c's format (magic {magic}, not "
                        f"{SHARD_MAGIC}): {SHARD_FIX}, or keep it out of --data_dir")
    if version != SHARD_VERSION:
        raise UserError(f"{path} is version {version} of the shard format, not {SHARD_VERSION} "
                        f"(GPT-2's uint16 ids): {SHARD_FIX}")
    whole = SHARD_HEADER_BYTES + count * np.dtype(SHARD_DTYPE).itemsize
    if size != whole:
        raise UserError(f"{path} has {size:,} bytes, and its header's {count:,} tokens make "
                        f"{whole:,} (a partial download?): {SHARD_FIX}")
    return count


def shard_meta(data_dir) -> dict:
    """The meta of the shards data_dir names, every header checked: GPT-2's BPE, the token
    counts, and "shards": {split: [[path, tokens], ...]} in the order open_split reads them."""
    paths = listed_shards(data_dir)
    if not paths:
        raise UserError(f"--data_dir={data_dir} matches no file: check the pattern, or download "
                        "the shards (README.md, FineWeb shards)")
    shards = {s: [] for s in SPLITS}
    for path in paths:
        if shard_split(path) is None:
            raise UserError(f"{path} matches --data_dir={data_dir} but is no train or val shard "
                            "(_train_ or _val_ in its name): narrow the pattern")
        shards[shard_split(path)].append([path, read_shard_header(path)])
    for split in SPLITS:
        if not shards[split]:
            raise UserError(f"--data_dir={data_dir} has no {split} shard (a *_{split}_*.bin "
                            f"file): download one (README.md, FineWeb shards), or widen the glob")
    return {**GPT2_BPE, "dtype": SHARD_DTYPE,
            **{f"{s}_tokens": sum(n for _, n in shards[s]) for s in SPLITS},
            "source": f"FineWeb shards {data_dir}", "shards": shards}


def open_split(data_dir, split: str, meta: dict) -> "Tokens":
    """A split's tokens, read as they are sliced: only what batches touch is read."""
    if "shards" in meta:  # shard_meta's: the files it checked, in order
        return ShardStream([TokenFile(path, SHARD_DTYPE, n, SHARD_HEADER_BYTES, SHARD_FIX)
                            for path, n in meta["shards"][split]], meta["vocab_size"])
    return TokenFile(Path(data_dir) / f"{split}.bin", meta["dtype"], meta[f"{split}_tokens"])


class Tokens:
    """n token ids read as they are sliced (np.asarray reads them all); a subclass's
    _read(start, count) reads count ids from start."""

    dtype: np.dtype
    n: int
    filename: str  # what errors call the tokens

    def __len__(self) -> int:
        return self.n

    @property
    def size(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, stride = index.indices(self.n)
            return self._read(start, max(0, stop - start))[::stride]
        position = range(self.n)[index]  # an int, negative ones too; IndexError past the end
        return self[position : position + 1][0]

    def __iter__(self):
        return iter(self[:])

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)

    def tolist(self) -> list:
        return self[:].tolist()


class TokenFile(Tokens):
    """The n tokens of a .bin file after `offset` header bytes, read with pread.

    Not a memmap: a file truncated under a running job makes a memmap's next read past the new
    end kill the process with SIGBUS, no message; here it is a short read, and one UserError line.
    """

    def __init__(self, path, dtype, n: int, offset: int = 0,
                 fix: str = "restore it (or prepare the dataset again)"):
        self.path, self.dtype, self.n = Path(path), np.dtype(dtype), n
        self.offset, self.fix = offset, fix
        self.filename = str(path)
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)

    def _read(self, start: int, count: int) -> np.ndarray:
        size = self.dtype.itemsize
        raw = os.pread(self.fd, count * size, self.offset + start * size)
        if len(raw) != count * size:
            now = os.fstat(self.fd).st_size
            raise UserError(f"{self.path} changed under this job: it now holds {now:,} bytes, "
                            f"{self.offset + self.n * size:,} when it was opened; {self.fix} "
                            "and rerun")
        return np.frombuffer(raw, self.dtype)


class ShardStream(Tokens):
    """Several shards' tokens as one stream, in the order given. A slice may run across a shard
    boundary, as the stream one train.bin of the same tokens would be: a FineWeb shard starts
    with a document's <|endoftext|>, so it is crossed like any boundary between documents."""

    def __init__(self, shards: list[TokenFile], vocab_size: int):
        self.shards, self.vocab_size, self.dtype = shards, vocab_size, np.dtype(SHARD_DTYPE)
        self.starts = np.cumsum([0] + [len(shard) for shard in shards]).tolist()  # first ids
        self.n = self.starts[-1]
        first, last = shards[0].path, shards[-1].path
        self.filename = str(first) if len(shards) == 1 else \
            str(first.parent / f"{first.name} .. {last.name} ({len(shards)} shards)")

    def _read(self, start: int, count: int) -> np.ndarray:
        stop, pieces = start + count, []
        i = bisect.bisect_right(self.starts, start) - 1  # the shard that holds start
        while i < len(self.shards) and (not pieces or self.starts[i] < stop):
            shard, begin = self.shards[i], self.starts[i]
            piece = shard[max(start - begin, 0) : stop - begin]
            # checked here, not only by BatchSampler, so that the error names the shard
            if piece.size and piece.max() >= self.vocab_size:
                raise UserError(f"{shard.path} holds token id {piece.max()}, outside GPT-2's "
                                f"vocabulary of {self.vocab_size}: it is no GPT-2 shard; "
                                f"{SHARD_FIX}")
            pieces.append(piece)
            i += 1
        return np.concatenate(pieces) if len(pieces) > 1 else \
            (pieces[0] if pieces else np.empty(0, self.dtype))


class CharTokenizer:
    def __init__(self, chars: str):
        self.chars, self.vocab_size, self.stoi = chars, len(chars), {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        if missing := sorted(set(text) - self.stoi.keys()):
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise UserError(f"prompt has characters not in the vocabulary: {', '.join(map(repr, missing[:20]))}{more}")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def addition_text(tokens, digits: int) -> str:
    """'12+34=46' from the tokens of one addition problem (prepare_addition.py): a's digits, b's,
    then the sum's digits + 1 digits reversed."""
    tokens = [int(t) for t in tokens]
    a = "".join(map(str, tokens[:digits]))
    b = "".join(map(str, tokens[digits : 2 * digits]))
    answer = "".join(map(str, tokens[2 * digits :][::-1])).lstrip("0") or "0"
    return f"{int(a)}+{int(b)}={answer}"


class AdditionTokenizer(CharTokenizer):
    """The digits as characters; decodes whole problems as '12+34=46', one a line."""

    def __init__(self, digits: int):
        super().__init__("0123456789")
        self.digits = digits

    def decode(self, ids) -> str:
        ids, size = [int(i) for i in ids], 3 * self.digits + 1
        whole = len(ids) // size * size
        lines = [addition_text(ids[i : i + size], self.digits) for i in range(0, whole, size)]
        return "\n".join(lines + ([super().decode(ids[whole:])] if ids[whole:] else []))


class GPT2Tokenizer:
    """tiktoken's GPT-2 BPE. encode_ordinary: "<|endoftext|>" in a text is text, not token 50256."""

    def __init__(self):
        import tiktoken  # here, so char-level runs never need it

        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # on a cache miss tiktoken downloads; offline that fails many ways
            raise UserError(f"cannot load the GPT-2 BPE files ({type(e).__name__}): connect to the "
                            "network, or set TIKTOKEN_CACHE_DIR to a directory that holds them")
        self.vocab_size, self.eot = self.enc.n_vocab, self.enc.eot_token  # 50257, 50256

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


GPT2_BPE = {"tokenizer": "gpt2", "vocab_size": 50257}  # what OpenAI's GPT-2 weights read


def tokenizer_of(meta: dict) -> dict:
    """What a dataset's (or a model's) token ids mean: its TOKENIZER_KEYS."""
    return {key: meta[key] for key in TOKENIZER_KEYS if key in meta}


def tokenizer_difference(ours: dict, theirs: dict) -> str | None:
    """How two tokenizers differ, in words, or None when an id means the same token in both."""
    if ours.get("tokenizer") != theirs.get("tokenizer"):
        return f"'{ours.get('tokenizer')}' tokens against '{theirs.get('tokenizer')}'"
    if ours.get("chars") != theirs.get("chars"):
        a, b = ours.get("chars") or "", theirs.get("chars") or ""
        if set(a) == set(b):
            return f"the same {len(a)} characters numbered in another order"
        return f"{len(a)} characters against {len(b)}, {len(set(a) - set(b))} of them not in the model's"
    if ours.get("digits") != theirs.get("digits"):
        return f"{ours.get('digits')}-digit problems against {theirs.get('digits')}-digit ones"
    return None


def load_tokenizer(meta: dict):
    if meta["tokenizer"] == "char" and "digits" in meta:
        return AdditionTokenizer(meta["digits"])  # prepare_addition.py's problems
    if meta["tokenizer"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["tokenizer"] == "gpt2":
        return GPT2Tokenizer()
    raise UserError(f"unknown tokenizer {meta['tokenizer']!r} in meta.json (expected 'char' or 'gpt2')")


# ---------------------------------------------------------------- batches

class BatchSampler:
    """Random contiguous windows of block_size+1 tokens: x = window[:-1], y = window[1:].

    With example_length (a dataset of fixed-length examples), each window is one whole example,
    and loss_mask (one 0/1 per target) turns the targets it zeroes into IGNORE.

    A batch is a pure function of (seed, step), so resuming from {"seed", "step"} is exact and a
    prefetch thread can run ahead without sharing RNG state. batch_size is the global micro-batch;
    process p of P keeps rows [p*B/P, (p+1)*B/P), so together the processes hold exactly the
    one-process batch (train.make_mesh has checked that B divides over the devices, so over P).
    """

    def __init__(self, tokens, block_size: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, *, example_length: int | None = None,
                 loss_mask=None, vocab_size: int | None = None):
        if min(block_size, batch_size, grad_accum, process_count) < 1 or not 0 <= process_index < process_count:
            raise UserError(f"bad batch settings: block_size {block_size}, batch_size {batch_size}, "
                            f"grad_accum {grad_accum}, process {process_index} of {process_count}")
        name = Path(tokens.filename).name if getattr(tokens, "filename", None) else "the data"
        if len(tokens) < block_size + 1:
            raise UserError(f"block_size {block_size} is larger than the data ({len(tokens)} tokens in "
                            f"{name}): lower --model.block_size")
        if example_length is not None and example_length != block_size + 1:
            raise UserError(f"the data holds examples of {example_length} tokens, a batch row is one: "
                            f"set --model.block_size={example_length - 1} (it is {block_size})")
        self.example_length, self.vocab_size, self.name = example_length, vocab_size, name
        self.loss_mask = None if loss_mask is None else np.asarray(loss_mask, bool)
        self.tokens, self.block_size, self.batch_size, self.grad_accum = tokens, block_size, batch_size, grad_accum
        self.seed, self.step = seed, 0
        rows = batch_size // process_count
        self.rows = slice(process_index * rows, (process_index + 1) * rows)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), each (grad_accum, batch_size // process_count, block_size) int32."""
        rng = np.random.default_rng([self.seed, step])
        # every process draws all the starts and keeps its rows: one stream at any process count
        shape = (self.grad_accum, self.batch_size)
        if self.example_length:  # the start of a random whole example
            starts = rng.integers(0, len(self.tokens) // self.example_length, size=shape)
            starts *= self.example_length
        else:
            starts = rng.integers(0, len(self.tokens) - self.block_size, size=shape)
        starts = starts[:, self.rows]
        window = np.empty(starts.shape + (self.block_size + 1,), np.int32)
        for i, s in np.ndenumerate(starts):
            window[i] = self.tokens[s : s + self.block_size + 1]  # one contiguous read per row
        # every batch is checked (a max over it is cheap; a scan of a 17 GB split at start is not)
        if self.vocab_size is not None and window.max(initial=0) >= self.vocab_size:
            raise UserError(f"{self.name} holds token id {window.max()}, outside the vocabulary of "
                            f"{self.vocab_size} in meta.json: the .bin files and meta.json do not "
                            "belong together; prepare the dataset again with --overwrite")
        x, y = window[..., :-1], window[..., 1:]
        if self.loss_mask is not None:
            y = np.where(self.loss_mask, y, IGNORE).astype(np.int32)
        return x, y

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, d: dict) -> None:
        self.seed, self.step = int(d["seed"]), int(d["step"])

    def __iter__(self):
        return self

    def __next__(self):
        x, y = self.batch(self.step)
        self.step += 1
        return x, y

    def prefetch(self, depth: int = 2):
        """The same batches as iterating, built up to `depth` ahead by a daemon thread so the
        accelerator never waits on disk. Taking k batches advances self.step by exactly k; don't
        call next(self) or load_state_dict meanwhile. close() it, or drop it, to stop the thread."""
        q, stop = queue.Queue(maxsize=depth), threading.Event()

        def put(item):
            while not stop.is_set():  # wake up now and then: a full queue must not block exit
                try:
                    return q.put(item, timeout=0.1)
                except queue.Full:
                    pass

        def work(step):
            try:
                while not stop.is_set():
                    put((step, self.batch(step)))
                    step += 1
            except Exception as e:  # re-raised in the consumer rather than lost in this thread
                put((None, e))

        def consume():
            try:
                while True:
                    step, item = q.get()
                    if step is None:
                        raise item
                    self.step = step + 1
                    yield item
            finally:
                stop.set()

        threading.Thread(target=work, args=(self.step,), daemon=True, name="BatchSampler.prefetch").start()
        batches = consume()
        weakref.finalize(batches, stop.set)  # also stops it when dropped unstarted, and at exit
        return batches
