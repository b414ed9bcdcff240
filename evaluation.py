"""Scoring a model beyond the loss a run watches: a whole split's loss, HellaSwag from a local
file, and exact match of greedy completions. eval.py reports them for a checkpoint; train.py
scores HellaSwag and exact match at each eval_interval.

- split_loss: every token of a split predicted once, in non-overlapping block_size windows (the
  last one partial, its missing targets ignored), batched in one compiled shape.
- HellaSwag (Zellers et al. 2019) in its own jsonl format: each of an item's 4 endings is scored
  by the cross entropy of its tokens after the context (GPT-2 BPE: the context's tokens, then
  those of " " + ending), as build-nanogpt and llm.c score it; acc picks the ending with the
  lowest summed loss, acc_norm the one with the lowest mean loss per token.
- completion_accuracy: a dataset's completion_eval (meta.json): each example decoded greedily
  from its prompt, right when every token matches (prepare_addition.py's sums).
"""

import functools
import json
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import data
from cli import UserError
from decode import generate
from model import GPT, token_losses

ENDINGS = 4  # HellaSwag's choices per item
SHORTEST_PADDING = 16  # HellaSwag rows are padded to 16, 32, 64, ... tokens: few compiled shapes


@eqx.filter_jit
def row_losses(model: GPT, inputs, targets, vocab_limit: int | None):
    """(summed cross entropy, number of targets) of each row, over the targets >= 0, computed as
    training's loss is (model.token_losses). vocab_limit: ids >= it (the padding of a rounded-up
    vocab_size) are left out of the softmax."""
    losses, counted = token_losses(model, inputs, targets, vocab_limit=vocab_limit)
    return jnp.sum(losses, axis=1), jnp.sum(counted, axis=1)


# ---------------------------------------------------------------------------------------------
# A whole split


def window_batches(tokens, block_size: int, batch_size: int, example_length: int | None = None,
                   loss_mask=None):
    """(inputs, targets) batches of batch_size rows that predict every token of tokens[1:] once.

    Text: row i reads tokens[i*block_size : (i+1)*block_size + 1]; the last row may be shorter.
    Fixed-length examples (meta.json's example_length): one example a row, loss_mask applied,
    as in training. Rows past the end, and the unused end of a short row, have IGNORE targets."""
    if example_length:
        stride, width, n_rows = example_length, example_length - 1, len(tokens) // example_length
    else:
        stride, width, n_rows = block_size, block_size, math.ceil((len(tokens) - 1) / block_size)
    counted = np.ones(width, bool) if loss_mask is None else np.asarray(loss_mask, bool)
    for first in range(0, n_rows, batch_size):
        inputs = np.zeros((batch_size, width), np.int32)
        targets = np.full((batch_size, width), data.IGNORE, np.int32)
        for row in range(min(batch_size, n_rows - first)):
            start = (first + row) * stride
            window = np.asarray(tokens[start : start + width + 1], np.int32)
            inputs[row, : len(window) - 1] = window[:-1]
            targets[row, : len(window) - 1] = window[1:]
        yield inputs, np.where(counted, targets, data.IGNORE)


def token_byte_lengths(meta: dict) -> np.ndarray | None:
    """The UTF-8 bytes each token id stands for: a character's encoding (char tokenizer), a BPE
    token's own bytes (gpt2). None for tokens that are no text (pixels)."""
    if meta["tokenizer"] == "char":
        return np.array([len(c.encode("utf-8")) for c in meta["chars"]], np.int64)
    if meta["tokenizer"] == "gpt2":
        enc = data.GPT2Tokenizer().enc
        return np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], np.int64)
    return None


def split_loss(model: GPT, tokens, batch_size: int, *, vocab_limit=None, example_length=None,
               loss_mask=None, byte_lengths=None, place=np.asarray) -> dict:
    """The mean loss over every counted token of a split, its perplexity and (given byte_lengths)
    bits per byte: the summed loss in bits over the UTF-8 bytes of the predicted tokens, which
    runs with different tokenizers share. place: puts a numpy batch on the devices."""
    sums, n_bytes = [], 0
    for inputs, targets in window_batches(tokens, model.config.block_size, batch_size,
                                          example_length, loss_mask):
        if byte_lengths is not None:
            n_bytes += int(byte_lengths[targets[targets >= 0]].sum())
        row_sums, row_counts = row_losses(model, place(inputs), place(targets), vocab_limit)
        sums.append((row_sums.sum(), row_counts.sum()))  # on device: no sync per batch
    totals = np.asarray(jax.device_get(sums), np.float64).reshape(-1, 2)
    loss_sum, count = float(totals[:, 0].sum()), int(totals[:, 1].sum())
    if count == 0:
        raise UserError("the split has no token to predict: it needs at least 2 tokens")
    return {"loss": loss_sum / count, "perplexity": math.exp(loss_sum / count),
            "bits_per_byte": loss_sum / math.log(2) / n_bytes if n_bytes else None,
            "tokens": count, "bytes": n_bytes or None}


# ---------------------------------------------------------------------------------------------
# HellaSwag


def hellaswag_problem(row) -> str | None:
    """What keeps a parsed line from being a HellaSwag item, if anything."""
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("ctx"), str) or not row["ctx"]:
        return "no non-empty string 'ctx'"
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) != ENDINGS or not all(
            isinstance(e, str) and e for e in endings):
        return f"'endings' is not a list of {ENDINGS} non-empty strings"
    if row.get("label") not in range(ENDINGS) or isinstance(row.get("label"), bool):
        return f"'label' is not an integer in 0..{ENDINGS - 1}"
    return None


@functools.lru_cache(maxsize=4)  # train.py scores the same file at every eval_interval
def read_hellaswag(path: str, block_size: int) -> tuple[dict, ...]:
    """The items of a HellaSwag jsonl (fields ctx, endings, label; ind kept when present), each
    tokenized with GPT-2's BPE: {"ind", "label", "ctx": ids, "endings": [ids] * 4}."""
    tokenizer = data.GPT2Tokenizer()
    how = "a HellaSwag jsonl such as hellaswag_val.jsonl, one item per line"
    if not Path(path).is_file():
        raise UserError(f"--hellaswag={path}: no such file: pass the path of {how}")
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--hellaswag={path} cannot be read ({e}): pass {how}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if problem := hellaswag_problem(row):
            raise UserError(f"{path} line {number}: {problem}: not HellaSwag's format ({how})")
        ctx = tokenizer.encode(row["ctx"])
        endings = [tokenizer.encode(" " + ending) for ending in row["endings"]]
        longest = len(ctx) + max(map(len, endings)) - 1  # the last token is only a target
        if longest > block_size:
            raise UserError(f"{path} line {number}: context and ending are {longest + 1} tokens, "
                            f"more than the model's block_size {block_size} + 1 can score")
        items.append({"ind": row.get("ind", len(items)), "label": row["label"], "ctx": ctx,
                      "endings": endings})
    if not items:
        raise UserError(f"--hellaswag={path} holds no items: pass {how}")
    return tuple(items)


def padded_width(item: dict, block_size: int) -> int:
    """The row length an item is padded to: a power of two (at least SHORTEST_PADDING), or
    block_size, so a whole file compiles a handful of shapes, never one per item."""
    longest = len(item["ctx"]) + max(map(len, item["endings"])) - 1
    return min(block_size, 2 ** math.ceil(math.log2(max(longest, SHORTEST_PADDING))))


def hellaswag_scores(model: GPT, items, items_per_batch: int, vocab_limit=None) -> dict:
    """acc, acc_norm and, per item, ind, label, pred, pred_norm, sum_loss and mean_loss (4 each).

    Items are grouped by padded width and scored items_per_batch at a time (x 4 endings, padded
    with empty rows): the number of compiled shapes does not grow with the number of items.
    Padding at the end of a row changes nothing before it: attention is causal."""
    by_width = {}
    for index, item in enumerate(items):
        by_width.setdefault(padded_width(item, model.config.block_size), []).append(index)
    pending = []
    for width, indices in sorted(by_width.items()):
        for first in range(0, len(indices), items_per_batch):
            chunk = indices[first : first + items_per_batch]
            inputs = np.zeros((items_per_batch * ENDINGS, width), np.int32)
            targets = np.full((items_per_batch * ENDINGS, width), data.IGNORE, np.int32)
            for row, (index, ending) in enumerate((i, e) for i in chunk for e in range(ENDINGS)):
                ctx, tokens = items[index]["ctx"], items[index]["endings"][ending]
                sequence = ctx + tokens
                inputs[row, : len(sequence) - 1] = sequence[:-1]
                targets[row, len(ctx) - 1 : len(sequence) - 1] = tokens  # the ending's tokens only
            pending.append((chunk, row_losses(model, inputs, targets, vocab_limit)))
    sum_loss = np.zeros((len(items), ENDINGS))
    counts = np.ones((len(items), ENDINGS))
    for chunk, (row_sums, row_counts) in zip((c for c, _ in pending),
                                             jax.device_get([r for _, r in pending])):
        sum_loss[chunk] = np.asarray(row_sums, np.float64)[: len(chunk) * ENDINGS].reshape(-1, ENDINGS)
        counts[chunk] = np.asarray(row_counts)[: len(chunk) * ENDINGS].reshape(-1, ENDINGS)
    mean_loss = sum_loss / counts
    pred, pred_norm = sum_loss.argmin(axis=1), mean_loss.argmin(axis=1)
    labels = np.array([item["label"] for item in items])
    examples = [{"ind": item["ind"], "label": item["label"], "pred": int(pred[i]),
                 "pred_norm": int(pred_norm[i]), "sum_loss": sum_loss[i].tolist(),
                 "mean_loss": mean_loss[i].tolist()} for i, item in enumerate(items)]
    return {"acc": float(np.mean(pred == labels)), "acc_norm": float(np.mean(pred_norm == labels)),
            "items": len(items), "examples": examples}


# ---------------------------------------------------------------------------------------------
# Exact match of greedy completions


@eqx.filter_jit
def greedy_completions(model, prompts, new_tokens: int, vocab_limit: int | None):
    """(examples, new_tokens) greedy continuations of equal-length prompts, KV-cached, vmapped."""
    key = jr.key(0)  # temperature 0 draws nothing

    def one(prompt):
        return generate(model, prompt, key, new_tokens, temperature=0.0, vocab_limit=vocab_limit)

    return jax.vmap(one)(prompts)


def completion_accuracy(model, examples: np.ndarray, prompt_length: int, vocab_limit=None,
                        batch_size: int = 1024) -> tuple[int, int]:
    """(correct, total) over examples (rows of tokens): a row is correct when its greedy
    continuation from its first prompt_length tokens equals the rest of it, token for token."""
    new_tokens = examples.shape[1] - prompt_length
    batch_size = min(batch_size, len(examples))
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = np.zeros((batch_size, prompt_length), np.int32)  # padded: one compiled shape
        prompts[: len(chunk)] = chunk[:, :prompt_length]
        out = np.asarray(jax.device_get(greedy_completions(model, prompts, new_tokens, vocab_limit)))
        correct += int(np.all(out[: len(chunk)] == chunk[:, prompt_length:], axis=1).sum())
    return correct, len(examples)


def exact_match(model, meta: dict, data_dir, split: str) -> dict:
    """The dataset's completion_eval (meta.json) on a split: its examples' prompts decoded
    greedily, {accuracy, correct, total, split}. vocab_limit: a model.vocab_size padded past the
    data's never decodes into the padding."""
    examples = np.asarray(data.open_split(data_dir, split, meta), np.int32)
    correct, total = completion_accuracy(model, examples.reshape(-1, meta["example_length"]),
                                         meta["completion_eval"]["prompt_length"],
                                         vocab_limit=meta["vocab_size"])
    return {"accuracy": correct / total, "correct": correct, "total": total, "split": split}
