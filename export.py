"""A run of the GPT-2 architecture -> Hugging Face's GPT-2 layout, which `transformers` loads.

    python export.py --rundir=runs/finetune_shakespeare --out=exported/
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('exported')"

Writes config.json and model.safetensors (gpt2.py holds the names). --checkpoint picks the
run's checkpoint as sample.py's and eval.py's do; the vocabulary's padding rows (50304 -> 50257)
are dropped. An existing --out is refused unless --overwrite.
"""

import os
import sys
from pathlib import Path

from cli import ArgumentParser, UserError, run_cli


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rundir", required=True, help="a run directory made by launch.py")
    parser.add_argument("--out", required=True, help="the directory to write")
    parser.add_argument("--checkpoint", default="auto",
                        help="latest, best or a step number (default: best if any has a val loss)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out={out} is a file: pass a directory to write the model into")
    if any((out / name).exists() for name in ("config.json", "model.safetensors")) and not args.overwrite:
        raise UserError(f"{out} already holds a model: pass --overwrite or another --out")

    import checkpoints  # here: --help needs neither jax nor orbax
    import gpt2

    config = checkpoints.read_run_config(Path(args.rundir))
    if changed := gpt2.not_in_gpt2_layout(config.model):
        raise UserError(f"{args.rundir} is not of the GPT-2 architecture (its model has "
                        f"{', '.join(changed)}): only such runs export to GPT-2's layout")
    tokenizer = checkpoints.run_tokenizer(Path(args.rundir))  # kept with the model for sample.py
    vocab_size = config.model.vocab_size
    if tokenizer:  # the tokenizer's vocabulary, without the padding rows
        vocab_size = min(vocab_size, tokenizer["vocab_size"])
    checkpoints.candidate_steps(Path(args.rundir), args.checkpoint)  # a bad --checkpoint, at once
    note = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    _, model, step = checkpoints.load_model(args.rundir, args.checkpoint, note=note)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):  # asked first: safetensors' own error names no cause
            raise OSError("read-only or no permission")
        gpt2.save(model, out, vocab_size, tokenizer)
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror or e}): pass another --out") from None
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'} (step {step}, "
          f"vocabulary {vocab_size})", file=sys.stderr)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
