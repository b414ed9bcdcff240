"""Every n-digit addition problem a+b -> train.bin, val.bin, meta.json (minGPT's adder).

    python prepare_addition.py                                        # 2 digits -> data/addition
    python prepare_addition.py --digits 3 --out_dir data/addition3    # 3 digits

A problem is 3n+1 tokens, the digits 0-9: a and b as n digits each (zero-padded), then the sum's
n+1 digits reversed, so each output digit depends only on digits already seen, as minGPT writes
it: 12+34=46 is the tokens 1 2 3 4 6 4 0. The problems are shuffled with --seed and split by
problem, so no val problem is ever trained on. meta.json tells training the rest: the data is
whole examples of 3n+1 tokens (block_size 3n), only the n+1 answer digits count in the loss,
and at the end of training every val problem is decoded greedily from its 2n prompt digits and
scored by exact match.
"""

import argparse

import numpy as np

import data
from cli import ArgumentParser, UserError, run_cli
from data import write_dataset

MAX_DIGITS = 4  # 10^8 problems at 4 digits already; more would not fit in memory this way


def problems(digits: int) -> np.ndarray:
    """All (a, b) with a, b < 10^digits, as an int64 array of shape (10^(2*digits), 2)."""
    a, b = np.divmod(np.arange(10 ** (2 * digits), dtype=np.int64), 10**digits)
    return np.stack([a, b], axis=1)


def to_digits(values: np.ndarray, width: int) -> np.ndarray:
    """Each value's `width` decimal digits, most significant first: shape values.shape + (width,)."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return values[..., None] // powers % 10


def encode(pairs: np.ndarray, digits: int) -> np.ndarray:
    """(problems, 3n+1) tokens: a's digits, b's digits, then (a+b)'s n+1 digits reversed."""
    a, b = pairs[:, 0], pairs[:, 1]
    answer = to_digits(a + b, digits + 1)[:, ::-1]
    return np.concatenate([to_digits(a, digits), to_digits(b, digits), answer], axis=1)


def decode(tokens, digits: int) -> str:
    """'12+34=46' from the tokens of one problem (or of a prompt and a decoded answer)."""
    return data.addition_text(tokens, digits)


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits", type=int, default=2, help="digits of a and b (default 2)")
    p.add_argument("--val_problems", type=int,
                   help="problems held out for val (default: 10%% of them, at most 10,000)")
    p.add_argument("--seed", type=int, default=1337, help="the shuffle that splits train and val")
    p.add_argument("--out_dir", help="default: data/addition (2 digits) or data/addition<n>")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in --out_dir")
    args = p.parse_args(argv)
    n = args.digits
    if not 1 <= n <= MAX_DIGITS:
        raise UserError(f"--digits={n}: must be 1 to {MAX_DIGITS}")
    total = 10 ** (2 * n)
    val_problems = min(total // 10, 10_000) if args.val_problems is None else args.val_problems
    if not 1 <= val_problems < total:
        raise UserError(f"--val_problems={val_problems}: must be 1 to {total - 1} "
                        f"(there are {total:,} problems of {n} digits)")
    out_dir = args.out_dir or ("data/addition" if n == 2 else f"data/addition{n}")

    order = np.random.default_rng(args.seed).permutation(total)
    tokens = encode(problems(n)[order], n)
    val, train = tokens[:val_problems], tokens[val_problems:]
    example_length = 3 * n + 1
    meta_extra = {
        "tokenizer": "char", "chars": "0123456789", "vocab_size": 10,
        "source": f"every {n}-digit problem a+b, shuffled with seed {args.seed}",
        "format": f"a ({n} digits), b ({n} digits), a+b ({n + 1} digits, reversed)",
        "split": f"{val_problems} problems val, the other {total - val_problems} train",
        "digits": n,
        # whole problems: batches are windows of exactly one problem each (data.BatchSampler)
        "example_length": example_length,
        # over the 3n targets of a problem (token i+1 predicted at position i): only the sum
        "loss_mask": [0] * (2 * n - 1) + [1] * (n + 1),
        # at the end of training: decode each val problem from its first 2n tokens, exact match
        "completion_eval": {"prompt_length": 2 * n},
    }
    meta = write_dataset(out_dir, train.reshape(-1), val.reshape(-1), meta_extra,
                         overwrite=args.overwrite)
    print(f"{out_dir}: {n}-digit addition, {len(train):,} train / {len(val):,} val problems of "
          f"{example_length} tokens, e.g. {' '.join(map(str, tokens[0]))} is {decode(tokens[0], n)}")
    return meta


if __name__ == "__main__":
    run_cli(main)
