"""scikit-learn's 8x8 handwritten digits as pixel tokens -> train.bin, val.bin, meta.json.

    python prepare_digits.py                 # label-prefixed images -> data/digits
    python prepare_digits.py --no-labels     # images alone (sampled unconditionally)

An image of the UCI handwritten digits that scikit-learn ships (1,797 of them, no download;
`pip install scikit-learn`, a dependency of this script alone) is 64 tokens: its pixels in raster
order, each quantised from 17 grey levels to 16 (tokens 0-15). Each image is prefixed by one
token: its class label (tokens 16-25, "0"-"9"), so a model trained on them draws a digit of the
class it is prompted with, or with --no-labels one start token (16). Images are shuffled with
--seed and split by image. `python sample.py --rundir=...` writes sampled images as a PNG grid.
"""

import argparse

import numpy as np

from cli import ArgumentParser, UserError, run_cli
from data import write_dataset

LEVELS = 16  # grey levels of a pixel token
SIDE = 8  # the images are SIDE x SIDE


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 8, 8) with values 0-16, labels (n,)) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("prepare_digits.py needs scikit-learn (its digits ship with it): "
                        "pip install scikit-learn") from None
    digits = load_digits()
    return digits.images, digits.target


def quantise(images: np.ndarray) -> np.ndarray:
    """Pixel values 0-16 (17 levels) -> tokens 0-15, rounding to the nearest of 16 levels."""
    return np.rint(np.asarray(images, np.float64) * (LEVELS - 1) / 16).astype(np.int64)


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=True,
                   help="prefix each image by its class label token (default: on)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="images held out (default 0.1)")
    p.add_argument("--seed", type=int, default=1337, help="the shuffle that splits train and val")
    p.add_argument("--out_dir", default="data/digits", help="default: data/digits")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in --out_dir")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction={args.val_fraction}: must be between 0 and 1")

    images, labels = load_images()
    pixels = quantise(images).reshape(len(images), SIDE * SIDE)  # raster order
    first = LEVELS + labels if args.labels else np.full(len(images), LEVELS)
    tokens = np.concatenate([first[:, None], pixels], axis=1)
    tokens = tokens[np.random.default_rng(args.seed).permutation(len(tokens))]
    n_val = max(1, round(len(tokens) * args.val_fraction))
    val, train = tokens[:n_val], tokens[n_val:]
    meta_extra = {
        "tokenizer": "pixels",
        "vocab_size": LEVELS + (10 if args.labels else 1),
        "source": "scikit-learn's load_digits (the UCI 8x8 handwritten digits)",
        "format": f"a prefix token, then {SIDE}x{SIDE} pixels in raster order, {LEVELS} grey levels",
        "split": f"{len(val)} images val, the other {len(train)} train, shuffled with seed {args.seed}",
        "image": {"height": SIDE, "width": SIDE, "levels": LEVELS},
        # the token before the pixels: labels[i] is token LEVELS + i, else the one start token
        "labels": [str(d) for d in range(10)] if args.labels else None,
        "start_token": None if args.labels else LEVELS,
        "example_length": 1 + SIDE * SIDE,  # one image per batch row (data.BatchSampler)
    }
    meta = write_dataset(args.out_dir, train.reshape(-1), val.reshape(-1), meta_extra,
                         overwrite=args.overwrite)
    print(f"{args.out_dir}: {len(train):,} train / {len(val):,} val images of {SIDE}x{SIDE} pixels, "
          f"{LEVELS} levels, {'label-prefixed' if args.labels else 'unlabelled'}")
    return meta


if __name__ == "__main__":
    run_cli(main)
