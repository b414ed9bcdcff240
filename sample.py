"""Text from a trained run: restores its parameters, prefills the prompt, decodes with a KV cache.

    python sample.py --rundir=runs/shakespeare_char
    python sample.py --rundir=runs/shakespeare_char --start="ROMEO:" --temperature=0 --num_samples=1
    python sample.py --rundir=runs/owt --start=FILE:prompt.txt --top_p=0.9 --checkpoint=best
    python sample.py --init_from=gpt2 --start="ROMEO:"     # OpenAI's GPT-2, downloaded (gpt2.py)
    python sample.py --rundir=runs/digits --num_samples=8     # images (prepare_digits.py): a PNG

Only the samples go to stdout, each followed by a line of dashes (as in nanoGPT), so the output
can be piped; progress goes to stderr. The tokenizer comes from the run's data directory
(GPT-2's BPE for --init_from). A run on images (a "pixels" dataset) draws images instead of text
and writes them as one PNG grid, a row per class label when the data has labels.
"""

import argparse
import dataclasses
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import data
import memory
from cli import ArgumentParser, UserError, run_cli
from decode import generate
from model import COMPUTE_DTYPES, GPT, pick_compute_dtype, with_config

SEPARATOR = "---------------"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Generation may run past the model's block_size: when the cache is full it is "
        "rebuilt from the most recent block_size//2 tokens and decoding goes on, so from then on "
        "the model sees between block_size/2 and block_size tokens of context. A prompt longer "
        "than block_size is cut to its last block_size tokens.",
    )
    parser.add_argument("--rundir", help="a run directory made by launch.py")
    parser.add_argument("--init_from", help="or GPT-2 weights: a directory with config.json and "
                        "model.safetensors (Hugging Face's layout), or gpt2, gpt2-medium, "
                        "gpt2-large, gpt2-xl (downloaded)")
    parser.add_argument("--start", default="\n",
                        help='the prompt, or FILE:path to read it from a file (default "\\n")')
    parser.add_argument("--num_samples", type=int, default=3, help="samples to draw (default 3)")
    parser.add_argument("--max_new_tokens", type=int, default=500,
                        help="tokens generated per sample (default 500)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0 is greedy (argmax) (default 0.8)")
    parser.add_argument("--top_k", type=int, default=0,
                        help="sample among the k most likely tokens only; 0 is off (default 0)")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="sample among the smallest set of tokens with probability mass >= p; "
                        "1 is off (default 1.0)")
    parser.add_argument("--seed", type=int, default=1337,
                        help="the same seed gives the same samples (default 1337)")
    parser.add_argument("--checkpoint", default="auto",
                        help="latest, best (lowest val loss) or a step number (default: best "
                        "when a checkpoint has a val loss, as nanoGPT keeps only its best; "
                        "else latest)")
    parser.add_argument("--out", help="images only (a run on a pixels dataset): the PNG to write "
                        "(default RUNDIR/samples.png); --start=LABEL draws that class only")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES,
                        help="compute dtype; auto: bfloat16, or float16 on GPUs without it "
                        "(default: the run's model.compute_dtype)")
    args = parser.parse_args(argv)
    if bool(args.rundir) == bool(args.init_from):
        raise UserError("say what to sample from: --rundir=RUN (a directory made by launch.py) "
                        "or --init_from=GPT2 (a GPT-2 directory or name), one of the two")
    for name, ok, rule in [
        ("seed", 0 <= args.seed < 2**63, "in [0, 2**63)"),  # jax.random.key's signed 64 bits
        ("num_samples", 1 <= args.num_samples < 2**31, "in [1, 2**31)"),  # int32 shapes
        ("max_new_tokens", 0 <= args.max_new_tokens < 2**31, "in [0, 2**31)"),
        ("temperature", args.temperature >= 0, ">= 0"),
        ("top_k", args.top_k >= 0, ">= 0"),
        ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
    ]:
        if not ok:
            raise UserError(f"--{name}={getattr(args, name)}: must be {rule}")
    return args


def status(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_prompt(start: str) -> str:
    text = data.read_text(start[len("FILE:"):]) if start.startswith("FILE:") else start
    if not text:
        raise UserError("the prompt is empty: pass --start with at least one character")
    return text


def load_tokenizer(data_dir: str, rundir: str):
    try:
        meta = data.load_meta(data_dir)
    except UserError as e:
        raise UserError(f"{e} (sample.py reads the tokenizer from {rundir}'s data directory "
                        f"{data_dir}; a relative path is relative to where you run it)") from None
    return (None if meta["tokenizer"] == "pixels" else data.load_tokenizer(meta)), meta


@eqx.filter_jit
def generate_samples(model: GPT, prompt, keys, max_new_tokens, temperature, top_k, top_p,
                     vocab_limit):
    """(num_samples, max_new_tokens) ids: one compiled program, the samples vmapped."""
    def one(key):
        return generate(model, prompt, key, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, vocab_limit=vocab_limit)

    return jax.vmap(one)(keys)


def with_dtype(model: GPT, dtype: str | None) -> GPT:
    """The same weights computing in dtype ("auto": this device's pick); None keeps the model's
    own compute_dtype."""
    if dtype == "auto":
        dtype, _ = pick_compute_dtype(jax.devices()[0])
    if dtype is None or dtype == model.config.compute_dtype:
        return model
    return with_config(model, dataclasses.replace(model.config, compute_dtype=dtype))


def out_of_memory_is_user_error(args):
    return memory.out_of_memory_is_user_error(
        f"{args.num_samples} x {args.max_new_tokens} new tokens do not fit in this device's memory",
        "lower --num_samples or --max_new_tokens")


def sample_keys(seed: int, num_samples: int):
    # fold_in: sample i is the same whatever num_samples is
    return jax.vmap(lambda i: jr.fold_in(jr.key(seed), i))(jnp.arange(num_samples))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.init_from:  # GPT-2's weights, or a run's export: the tokenizer its config.json names
        import gpt2

        directory = gpt2.resolve(args.init_from)
        vocab = gpt2.read_config(directory)[1]
        if (tokens := gpt2.read_tokenizer(directory)) is None:
            raise UserError(f"{args.init_from} does not say what its token ids mean (a vocabulary "
                            f"of {vocab}, not GPT-2's, and no tokenizer recorded): sample from its "
                            "run with --rundir, or export it again")
        tokenizer, source = data.load_tokenizer(tokens), f"{args.init_from}"
        prompt = tokenizer.encode(read_prompt(args.start))
        model, vocab_size = gpt2.load(args.init_from)
    else:
        import checkpoints  # here: --help needs neither jax nor orbax

        rundir = Path(args.rundir)
        config = checkpoints.read_run_config(rundir)
        tokens = checkpoints.run_tokenizer(rundir)
        if tokens and tokens["tokenizer"] != "pixels":  # as the run recorded it: no data needed
            tokenizer, meta = data.load_tokenizer(tokens), tokens
        else:
            tokenizer, meta = load_tokenizer(config.data_dir, args.rundir)
        vocab_size = meta["vocab_size"]
        checkpoints.candidate_steps(rundir, args.checkpoint)  # a bad --checkpoint fails fast
        # encoded before the weights load: a prompt the tokenizer cannot read fails fast
        prompt = None if tokenizer is None else tokenizer.encode(read_prompt(args.start))
        _, model, step = checkpoints.load_model(rundir, args.checkpoint, note=status)
        source = f"{args.rundir} (checkpoint at step {step})"
        if tokenizer is None:  # pixels
            return sample_images(args, model, meta, source)
    if len(prompt) == 0:
        raise UserError("the prompt encodes to no tokens: pass a longer --start")
    model = with_dtype(model, args.dtype or ("float32" if args.init_from else None))
    status(f"sampling {args.num_samples} x {args.max_new_tokens} tokens from {source}, "
           f"{model.config.compute_dtype}, prompt of {len(prompt)} tokens, block_size "
           f"{model.config.block_size}")

    t0 = time.perf_counter()
    # a vocab_size rounded up past the tokenizer's (GPT-2: 50257 -> 50304) must not be sampled
    vocab_limit = vocab_size if vocab_size < model.config.vocab_size else None
    keys = sample_keys(args.seed, args.num_samples)
    with out_of_memory_is_user_error(args):
        ids = jax.device_get(generate_samples(model, jnp.asarray(prompt, jnp.int32), keys,
                                              args.max_new_tokens, args.temperature, args.top_k,
                                              args.top_p, vocab_limit))
    seconds = time.perf_counter() - t0
    for row in ids:
        print(tokenizer.decode(prompt + [int(i) for i in row]))
        print(SEPARATOR, flush=True)
    status(f"{ids.size} tokens in {seconds:.1f}s, compilation included")


# ---------------------------------------------------------------------------------------------
# Images (prepare_digits.py): pixel tokens in raster order after a label or start token


def sample_images(args, model: GPT, meta: dict, source: str) -> np.ndarray:
    """Draws num_samples images per class label (or unconditionally) and writes them as a PNG
    grid, one row per prompt. Returns the pixel tokens, (rows, num_samples, height, width)."""
    shape, levels = meta["image"], meta["image"]["levels"]
    labels = meta.get("labels")
    if labels:
        chosen = labels if args.start == "\n" else [args.start]
        if chosen[0] not in labels:
            raise UserError(f"--start={args.start!r} is not a class label of this data: pass one "
                            f"of {', '.join(labels)}, or no --start for every class")
        prompts = [levels + labels.index(label) for label in chosen]
    else:
        if args.start != "\n":
            raise UserError("this data has no class labels: drop --start")
        chosen, prompts = ["(unconditional)"], [meta["start_token"]]
    out = Path(args.out or Path(args.rundir) / "samples.png")
    model = with_dtype(model, args.dtype)
    pixels = shape["height"] * shape["width"]
    status(f"sampling {args.num_samples} images for each of {len(prompts)} prompts from {source}")
    keys = sample_keys(args.seed, args.num_samples)
    rows = []
    for prompt in prompts:  # one compiled program: every prompt is one token
        # vocab_limit: only pixel tokens (ids < levels) are drawn, never a label token
        with out_of_memory_is_user_error(args):
            ids = generate_samples(model, jnp.asarray([prompt], jnp.int32), keys, pixels,
                                   args.temperature, args.top_k, args.top_p, levels)
        rows.append(np.asarray(jax.device_get(ids)).reshape(args.num_samples, shape["height"],
                                                            shape["width"]))
    images = np.stack(rows)
    write_png(out, image_grid(images, levels))
    status(f"wrote {out}: {len(prompts)} rows ({', '.join(chosen)}) of {args.num_samples} images")
    return images


def image_grid(images: np.ndarray, levels: int, scale: int = 4, gap: int = 2) -> np.ndarray:
    """(rows, cols, h, w) pixel levels -> one greyscale uint8 picture, ink dark on white, each
    pixel scale x scale, images gap pixels apart."""
    rows, cols, h, w = images.shape
    ink = 255 - np.rint(images * (255 / (levels - 1))).astype(np.uint8)  # level 0 is paper
    cell_h, cell_w = h * scale + gap, w * scale + gap
    grid = np.full((rows * cell_h + gap, cols * cell_w + gap), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = gap + r * cell_h, gap + c * cell_w
            grid[y : y + h * scale, x : x + w * scale] = np.kron(ink[r, c], np.ones((scale, scale), np.uint8))
    return grid


def write_png(path: Path, grey: np.ndarray) -> None:
    """An 8-bit greyscale PNG (the PNG spec's IHDR, IDAT, IEND chunks; zlib from the standard
    library), written to a temporary file and renamed into place."""
    height, width = grey.shape
    scanlines = b"".join(b"\x00" + row.tobytes() for row in grey.astype(np.uint8))  # filter 0

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, greyscale
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines))
           + chunk(b"IEND", b""))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(png)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}")


if __name__ == "__main__":
    run_cli(main)
