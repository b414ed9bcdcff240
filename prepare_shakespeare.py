"""Tiny Shakespeare (or any UTF-8 text file) -> train.bin, val.bin, meta.json.

    python prepare_shakespeare.py                     # characters  -> data/shakespeare_char
    python prepare_shakespeare.py --tokenizer gpt2    # GPT-2 BPE   -> data/shakespeare
    python prepare_shakespeare.py --input ../shared/data/tinyshakespeare/input.txt   # offline

The first 90% of the characters are train, the rest val, as in nanoGPT. On Tiny Shakespeare:
char: vocab 65, 1,003,854 train / 111,540 val tokens; gpt2: 301,966 / 36,059 tokens.
"""

import argparse
import urllib.request

import numpy as np

from cli import ArgumentParser, UserError, run_cli
from data import CharTokenizer, GPT2Tokenizer, read_text, write_dataset

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def download(url: str) -> str:
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read().decode("utf-8")
    except (OSError, ValueError) as e:  # URLError, timeouts and bad bytes all land here
        raise UserError(f"cannot download {url} ({e}): pass --input PATH to a local copy")


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="local UTF-8 text file (default: download Tiny Shakespeare)")
    p.add_argument("--tokenizer", choices=["char", "gpt2"], default="char")
    p.add_argument("--out_dir", help="default: data/shakespeare_char (char) or data/shakespeare (gpt2)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in --out_dir")
    args = p.parse_args(argv)
    out_dir = args.out_dir or ("data/shakespeare_char" if args.tokenizer == "char" else "data/shakespeare")

    text = read_text(args.input) if args.input else download(URL)
    source = args.input or URL
    if len(text) < 2:
        raise UserError(f"{source} is {'empty' if not text else 'one character'}: nothing to split into train and val")
    n = int(len(text) * 0.9)
    if args.tokenizer == "char":
        chars = "".join(sorted(set(text)))  # the alphabet is whatever the text uses
        tok, meta_extra = CharTokenizer(chars), {"tokenizer": "char", "chars": chars}
    else:
        tok = GPT2Tokenizer()
        meta_extra = {"tokenizer": "gpt2"}
    # each split is encoded on its own, so no BPE token straddles the boundary
    train_ids, val_ids = (np.array(tok.encode(t), dtype=np.int64) for t in (text[:n], text[n:]))
    meta_extra |= {"vocab_size": tok.vocab_size, "source": source, "split": "first 90% of characters train"}
    meta = write_dataset(out_dir, train_ids, val_ids, meta_extra, overwrite=args.overwrite)
    print(f"{out_dir}: {args.tokenizer} tokenizer, vocab {meta['vocab_size']:,}, "
          f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens")
    return meta


if __name__ == "__main__":
    run_cli(main)
