"""A model's scores as a researcher reports them: a whole split's loss, HellaSwag, task accuracy.

    python eval.py --rundir=runs/shakespeare_char            # val loss, perplexity, bits per byte
    python eval.py --rundir=runs/owt --split=train --checkpoint=latest
    python eval.py --init_from=gpt2 --data_dir=data/shakespeare   # GPT-2's loss on your data
    python eval.py --init_from=gpt2 --hellaswag=hellaswag_val.jsonl --out=results.json
    python eval.py --rundir=runs/addition                    # + exact match (meta.json asks for it)

The loss counts every token of the split once (evaluation.py), not eval_iters sampled batches
as training does. Bits per byte is the summed loss in bits over the UTF-8 bytes of the predicted
tokens (a character's bytes for the char tokenizer, a BPE token's bytes for gpt2), so runs with
different tokenizers compare. Results go to stdout, progress to stderr; --out writes them as JSON
too, with each HellaSwag item's scores. Offline: HellaSwag is read from a local file.
"""

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

import data
import evaluation
from cli import ArgumentParser, UserError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rundir", help="a run directory made by launch.py")
    parser.add_argument("--init_from", help="or GPT-2 weights: a directory with config.json and "
                        "model.safetensors (Hugging Face's layout), or gpt2, gpt2-medium, "
                        "gpt2-large, gpt2-xl (downloaded)")
    parser.add_argument("--checkpoint", default="auto",
                        help="latest, best (lowest val loss) or a step number (default: best when "
                        "a checkpoint has a val loss, else latest)")
    parser.add_argument("--data_dir", help="a prepared dataset or FineWeb shards (default: the "
                        "run's; none for --init_from, which then scores only --hellaswag)")
    parser.add_argument("--split", choices=data.SPLITS, default="val",
                        help="the split whose every token is scored (default val)")
    parser.add_argument("--hellaswag", help="a HellaSwag jsonl (its own format, e.g. "
                        "hellaswag_val.jsonl) to score; the data must be in GPT-2's BPE")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="sequences per forward pass; HellaSwag takes batch_size // 4 items "
                        "of 4 endings (default 8)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32", "auto"),
                        help="compute dtype; auto: bfloat16, or float16 on GPUs without it "
                        "(default: the run's model.compute_dtype; float32 for --init_from)")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if bool(args.rundir) == bool(args.init_from):
        raise UserError("say what to evaluate: --rundir=RUN (a directory made by launch.py) or "
                        "--init_from=GPT2 (a GPT-2 directory or name), one of the two")
    if args.init_from and not (args.data_dir or args.hellaswag):
        raise UserError("nothing to evaluate: give GPT-2 a --data_dir in GPT-2's BPE (e.g. "
                        "python prepare_shakespeare.py --tokenizer gpt2) or a --hellaswag file")
    if args.batch_size < 1:
        raise UserError(f"--batch_size={args.batch_size}: must be >= 1")
    if args.out and (Path(args.out).is_dir() or not Path(args.out).absolute().parent.is_dir()):
        raise UserError(f"--out={args.out}: not a file in an existing directory")
    return args


def status(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def model_shapes(args):
    """(the model's GPTConfig, what its token ids mean or None, the run's data_dir or None), read
    before any weights are, so bad input fails fast."""
    if args.init_from:
        import gpt2

        directory = gpt2.resolve(args.init_from)
        return gpt2.read_config(directory)[0], gpt2.read_tokenizer(directory), None
    import checkpoints

    config = checkpoints.read_run_config(Path(args.rundir))
    checkpoints.candidate_steps(Path(args.rundir), args.checkpoint)  # a bad --checkpoint, at once
    return config.model, checkpoints.run_tokenizer(Path(args.rundir)), config.data_dir


def load(args):
    """(the model in the compute dtype asked for, a function placing a batch on its devices, the
    checkpoint's step or None)."""
    import dataclasses

    from model import pick_compute_dtype, with_config

    if args.init_from:
        import gpt2

        model, _ = gpt2.load(args.init_from)
        place, step = np.asarray, None
    else:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        import checkpoints
        from sharding import make_mesh

        # the run's parameters on the devices present, FSDP over all of them (as sample.py)
        config, model, step = checkpoints.load_model(args.rundir, args.checkpoint, note=status)
        rows = NamedSharding(make_mesh(config), P(("data", "fsdp")))
        place = lambda batch: jax.device_put(batch, rows)  # noqa: E731
    dtype = args.dtype or ("float32" if args.init_from else model.config.compute_dtype)
    if dtype == "auto":
        dtype, _ = pick_compute_dtype(jax.devices()[0])
    if dtype != model.config.compute_dtype:
        model = with_config(model, dataclasses.replace(model.config, compute_dtype=dtype))
    return model, place, step


def main(argv=None) -> dict:
    args = parse_args(argv)
    shapes, model_tokens, run_data = model_shapes(args)
    block_size = shapes.block_size
    data_dir = args.data_dir or run_data
    meta = data.load_meta(data_dir) if data_dir else None
    if meta and model_tokens and (differ := data.tokenizer_difference(data.tokenizer_of(meta),
                                                                      model_tokens)):
        how = "--tokenizer gpt2" if model_tokens["tokenizer"] == "gpt2" else "the model's tokenizer"
        raise UserError(f"{data_dir}'s token ids mean other tokens than the model's ({differ}): "
                        f"pass a --data_dir prepared with {how}")
    if meta and model_tokens is None:
        raise UserError(f"{args.init_from or args.rundir} does not say what its token ids mean (a "
                        f"vocabulary of {shapes.vocab_size}, not GPT-2's, and no tokenizer recorded): "
                        "it cannot be checked against the data; export it again from its run")
    if args.hellaswag and meta and meta["tokenizer"] != "gpt2":
        raise UserError(f"HellaSwag is scored in GPT-2's BPE and {data_dir} is tokenized "
                        f"'{meta['tokenizer']}': drop --hellaswag")
    items = evaluation.read_hellaswag(args.hellaswag, block_size) if args.hellaswag else None
    # a data set of fixed-length examples is scored an example a row, as it trains
    if meta and meta.get("example_length") and meta["example_length"] - 1 > block_size:
        raise UserError(f"{data_dir} holds examples of {meta['example_length']} tokens, longer "
                        f"than the model's block_size {block_size} + 1")
    if meta and meta["vocab_size"] > shapes.vocab_size:
        raise UserError(f"{data_dir} has a vocabulary of {meta['vocab_size']}, more than the "
                        f"model's {shapes.vocab_size}: pass the --data_dir it was trained on")
    model, place, step = load(args)
    source = args.init_from or f"{args.rundir} (checkpoint at step {step})"
    results = {"model": source, "compute_dtype": model.config.compute_dtype}
    batch_size = math.ceil(args.batch_size / jax.device_count()) * jax.device_count()

    if meta:
        results["loss"] = score_split(model, place, meta, data_dir, args.split, batch_size, source)
        if "completion_eval" in meta:
            match = results["exact_match"] = evaluation.exact_match(model, meta, data_dir, args.split)
            print(f"exact match on {args.split}: {100 * match['accuracy']:.2f}% ({match['correct']:,} "
                  f"of {match['total']:,} examples, greedy)", flush=True)
    if items:
        status(f"scoring {len(items):,} HellaSwag items from {args.hellaswag}")
        vocab_limit = data.GPT2Tokenizer().vocab_size
        scores = evaluation.hellaswag_scores(model, items, max(1, batch_size // evaluation.ENDINGS),
                                             vocab_limit=vocab_limit)
        results["hellaswag"] = {"file": args.hellaswag, **scores}
        print(f"hellaswag: acc {scores['acc']:.4f} | acc_norm {scores['acc_norm']:.4f} "
              f"({scores['items']:,} items)", flush=True)
    if args.out:
        write_json(Path(args.out), results)
        status(f"wrote {args.out}")
    return results


def score_split(model, place, meta: dict, data_dir, split: str, batch_size: int, source) -> dict:
    """The whole split's loss, perplexity, bits per byte and tokens/s (compilation not timed)."""
    tokens = data.open_split(data_dir, split, meta)
    # vocab_limit: the padding of a rounded-up vocab_size (GPT-2: 50257 -> 50304) is no token
    vocab_limit = meta["vocab_size"] if meta["vocab_size"] < model.config.vocab_size else None
    layout = {"example_length": meta.get("example_length"), "loss_mask": meta.get("loss_mask")}
    status(f"scoring every token of {tokens.filename} ({len(tokens):,} tokens) with "
           f"{source}, {model.config.compute_dtype}")
    for inputs, targets in itertools.islice(evaluation.window_batches(
            tokens, model.config.block_size, batch_size, **layout), 1):  # compile, untimed
        jax.block_until_ready(evaluation.row_losses(model, place(inputs), place(targets), vocab_limit))
    t0 = time.perf_counter()
    loss = evaluation.split_loss(model, tokens, batch_size, vocab_limit=vocab_limit, place=place,
                                 byte_lengths=evaluation.token_byte_lengths(meta), **layout)
    seconds = time.perf_counter() - t0
    loss.update(data_dir=str(data_dir), split=split, seconds=seconds,
                tokens_per_s=loss["tokens"] / seconds)
    bpb = "" if loss["bits_per_byte"] is None else f" | {loss['bits_per_byte']:.4f} bits per byte"
    print(f"{split} loss {loss['loss']:.4f} | perplexity {loss['perplexity']:.3f}{bpb} | "
          f"{loss['tokens']:,} tokens in {seconds:.1f}s ({loss['tokens_per_s']:,.0f} tokens/s)",
          flush=True)
    return loss


def write_json(path: Path, obj) -> None:
    """Written to a temporary file and renamed: an interrupted write leaves no half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


if __name__ == "__main__":
    run_cli(main)
