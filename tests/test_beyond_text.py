"""Beyond text: addition problems and images as tokens (prepare_addition.py, prepare_digits.py),
the loss mask and whole-example batches they need, the exact-match evaluation and PNG samples.

scikit-learn is an optional dependency of prepare_digits.py alone, so the digits tests feed it
synthetic images in its place (and check the one-line error when it is missing).
"""

import json
import struct
import zlib
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import data
import evaluation
import prepare_addition
import prepare_digits
import sample
from cli import UserError
from model import GPT, GPTConfig, loss_fn
from test_train import assert_one_line_error, run, scalars

# ---------------------------------------------------------------------------------------------
# Addition: the dataset


def problems_of(tokens: np.ndarray, digits: int) -> list[tuple[int, int, int]]:
    """(a, b, the sum as written) for each problem: the last n+1 digits read back reversed."""
    rows = tokens.reshape(-1, 3 * digits + 1)
    as_int = lambda ds: int("".join(map(str, ds)))  # noqa: E731
    return [(as_int(r[:digits]), as_int(r[digits : 2 * digits]), as_int(r[2 * digits :][::-1]))
            for r in rows]


@pytest.mark.parametrize("digits", [1, 2])
def test_addition_holds_every_problem_once_split_by_problem_with_correct_sums(tmp_path, digits):
    meta = prepare_addition.main(["--digits", str(digits), "--out_dir", str(tmp_path / "add")])
    split = {s: problems_of(np.asarray(data.open_split(tmp_path / "add", s, meta)), digits)
             for s in data.SPLITS}
    pairs = {s: {(a, b) for a, b, _ in split[s]} for s in split}
    assert len(split["train"]) + len(split["val"]) == 10 ** (2 * digits)
    assert pairs["train"] | pairs["val"] == {(a, b) for a in range(10**digits) for b in range(10**digits)}
    assert not pairs["train"] & pairs["val"]  # no val problem is ever trained on
    assert all(a + b == total for s in split.values() for a, b, total in s)
    assert meta["example_length"] == 3 * digits + 1
    assert meta["loss_mask"] == [0] * (2 * digits - 1) + [1] * (digits + 1)
    assert meta["completion_eval"] == {"prompt_length": 2 * digits}
    assert prepare_addition.decode([1, 2, 3, 4, 6, 4, 0], 2) == "12+34=46"
    # sample.py's tokenizer for this data speaks the same language, one problem a line
    tokens, text = {1: ([3, 4, 7, 0, 9, 9, 8, 1, 5], "3+4=7\n9+9=18\n5"),
                    2: ([1, 2, 3, 4, 6, 4, 0, 9, 9, 0, 1, 0, 0, 1, 5], "12+34=46\n99+1=100\n5")}[digits]
    tokenizer = data.load_tokenizer(meta)
    assert tokenizer.decode(tokens) == text and tokenizer.encode("1234") == [1, 2, 3, 4]


def test_addition_bad_arguments_are_one_line(tmp_path):
    assert_one_line_error(run(["prepare_addition.py", "--digits", "0", "--out_dir", tmp_path / "a"]),
                          "--digits=0")
    assert_one_line_error(run(["prepare_addition.py", "--digits", "1", "--val_problems", "100",
                              "--out_dir", tmp_path / "a"]), "--val_problems=100")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------------------
# Whole-example batches and the loss mask


@pytest.fixture(scope="module")
def addition_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("addition") / "addition"
    prepare_addition.main(["--digits", "2", "--out_dir", str(out)])
    return out


def example_sampler(addition_dir, split="train", **kw) -> data.BatchSampler:
    meta = data.load_meta(addition_dir)
    tokens = data.open_split(addition_dir, split, meta)
    return data.BatchSampler(tokens, 6, 16, 2, seed=7, example_length=meta["example_length"],
                             loss_mask=meta["loss_mask"], **kw)


def test_example_batches_are_whole_problems_with_only_the_sum_as_targets(addition_dir):
    meta = data.load_meta(addition_dir)
    problems = {tuple(r) for r in np.asarray(data.open_split(addition_dir, "train", meta)).reshape(-1, 7)}
    x, y = example_sampler(addition_dir).batch(3)
    assert x.shape == y.shape == (2, 16, 6)
    assert np.all(y[..., :3] == data.IGNORE)  # the question's digits count in no loss
    for row_x, row_y in zip(x.reshape(-1, 6), y.reshape(-1, 6)):
        assert tuple(row_x) + (row_y[-1],) in problems  # a whole problem, from its first digit
        assert np.array_equal(row_y[3:], row_x[4:].tolist() + [row_y[-1]])  # shifted by one
    # a pure function of (seed, step), split over processes as the one-process batch
    halves = [example_sampler(addition_dir, process_index=p, process_count=2).batch(3) for p in (0, 1)]
    assert np.array_equal(np.concatenate([h[0] for h in halves], axis=1), x)


def test_example_data_needs_block_size_one_less_than_an_example(addition_dir):
    meta = data.load_meta(addition_dir)
    tokens = data.open_split(addition_dir, "train", meta)
    with pytest.raises(UserError, match="--model.block_size=6"):
        data.BatchSampler(tokens, 8, 4, example_length=7)


def test_a_meta_with_an_inconsistent_example_layout_is_refused(addition_dir, tmp_path):
    for change in ({"example_length": 4}, {"loss_mask": [1, 0]}, {"example_length": None}):
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        meta = json.loads((addition_dir / "meta.json").read_text())
        meta.update(change)
        for s in data.SPLITS:
            (bad / f"{s}.bin").write_bytes((addition_dir / f"{s}.bin").read_bytes())
        (bad / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
        with pytest.raises(UserError, match="meta.json"):
            data.load_meta(bad)


def tiny_model(vocab=12, block=8) -> GPT:
    config = GPTConfig(block_size=block, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32,
                       compute_dtype="float32")
    return GPT(config, key=jr.key(0))


def test_the_loss_counts_only_targets_that_are_not_ignored():
    # float32 on CPU; the reference is optax's per-token cross entropy over the same logits
    model = tiny_model()
    tokens = jr.randint(jr.key(1), (4, 8), 0, 12)
    targets = jr.randint(jr.key(2), (4, 8), 0, 12)
    counted = jnp.arange(8) >= 5
    masked = jnp.where(counted, targets, data.IGNORE)
    # jitted: eagerly, each of the model's operations compiles on its own (15 s against 3)
    per_token = eqx.filter_jit(lambda m: optax.softmax_cross_entropy_with_integer_labels(
        jax.vmap(m)(tokens), targets))(model)
    expected = per_token[:, 5:].mean()
    loss = eqx.filter_jit(loss_fn)
    np.testing.assert_allclose(loss(model, tokens, masked), expected, rtol=1e-5)
    # with every target counted, it is the plain mean
    np.testing.assert_allclose(loss(model, tokens, targets), per_token.mean(), rtol=1e-5)
    # and the gradient is that of the counted positions' mean alone
    def counted_only(m):
        ce = optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(tokens), targets)
        return ce[:, 5:].mean()

    grads = eqx.filter_jit(jax.grad(lambda m: loss_fn(m, tokens, masked)))(model)
    expected_grads = eqx.filter_jit(jax.grad(counted_only))(model)
    np.testing.assert_allclose(grads.embed, expected_grads.embed, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grads.blocks.mlp.fc.weight, expected_grads.blocks.mlp.fc.weight,
                               rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Exact match by greedy KV-cache decoding


logits_of = eqx.filter_jit(GPT.__call__)  # jitted: eagerly, every operation compiles on its own


def naive_greedy(model: GPT, prompt: np.ndarray, new_tokens: int) -> list[int]:
    """Greedy continuation by the full forward over the whole sequence for every token."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(int(jnp.argmax(logits_of(model, jnp.asarray(tokens))[-1])))
    return tokens[len(prompt):]


def test_completion_accuracy_counts_the_examples_whose_greedy_continuation_matches():
    model = tiny_model(vocab=10, block=6)  # a 2-digit problem: 4 prompt tokens, 3 answer tokens
    prompts = np.asarray(jr.randint(jr.key(4), (11, 4), 0, 10))
    answers = np.asarray([naive_greedy(model, p, 3) for p in prompts])
    wrong = answers.copy()
    wrong[::3, 1] = (wrong[::3, 1] + 1) % 10  # every third example gets one wrong digit
    examples = np.concatenate([prompts, wrong], axis=1)
    # batch_size 4: three batches, the last one padded
    correct, total = evaluation.completion_accuracy(model, examples, 4, batch_size=4)
    assert total == 11 and correct == 11 - len(range(0, 11, 3))


@pytest.mark.slow
def test_addition_run_logs_exact_match_at_every_evaluation(tmp_path):
    prepared = run(["prepare_addition.py", "--digits", "1", "--out_dir", tmp_path / "add1"])
    assert prepared.returncode == 0, prepared.stderr
    done = run(["launch.py", "--config=addition", f"--data_dir={tmp_path / 'add1'}",
               f"--rundir={tmp_path / 'run'}", "--model.block_size=3", "--max_steps=20",
               "--warmup_steps=2", "--eval_interval=10", "--eval_iters=2", "--log_interval=10",
               "--model.n_layer=1", "--model.n_embd=32"])
    assert done.returncode == 0, done.stderr
    lines = [l for l in done.stdout.splitlines() if "exact match on val" in l]
    assert [l.split(" |")[0] for l in lines] == ["step 10", "step 20"], lines
    assert "of 10 examples" in lines[-1]  # 1-digit: 10 val problems
    logged = float(lines[-1].split("val: ")[1].split("%")[0]) / 100
    events = scalars(tmp_path / "run")["eval/exact_match"]
    assert list(events) == [10, 20] and events[20] == pytest.approx(logged, abs=5e-5)
    # the wrong block_size for the data: one line naming the fix, nothing written
    bad = run(["launch.py", "--config=addition", f"--data_dir={tmp_path / 'add1'}",
              f"--rundir={tmp_path / 'bad'}"])
    assert_one_line_error(bad, "--model.block_size=3")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# Digits: images as tokens


def fake_digits(n=40):
    """Images with values 0-16 as scikit-learn's, and labels 0-9."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 17, size=(n, 8, 8)).astype(np.float64), np.arange(n) % 10


@pytest.mark.parametrize("labels", [True, False])
def test_digits_are_a_prefix_token_and_64_quantised_pixels_split_by_image(tmp_path, monkeypatch, labels):
    images, targets = fake_digits()
    monkeypatch.setattr(prepare_digits, "load_images", lambda: (images, targets))
    meta = prepare_digits.main(["--out_dir", str(tmp_path / "d")] + ([] if labels else ["--no-labels"]))
    rows = np.concatenate([np.asarray(data.open_split(tmp_path / "d", s, meta)).reshape(-1, 65)
                           for s in data.SPLITS])
    assert len(rows) == 40 and meta["example_length"] == 65 and meta["val_tokens"] == 4 * 65
    expected = {(int(prefix),) + tuple(np.rint(img.reshape(-1) * 15 / 16).astype(int))
                for img, prefix in zip(images, 16 + targets if labels else np.full(40, 16))}
    assert {tuple(r) for r in rows} == expected  # each image once, train and val together
    assert rows[:, 1:].max() <= 15 and meta["image"] == {"height": 8, "width": 8, "levels": 16}
    assert meta["vocab_size"] == (26 if labels else 17)
    assert prepare_digits.quantise(np.array([0, 8, 16])).tolist() == [0, 8, 15]


def test_prepare_digits_without_scikit_learn_is_one_line(tmp_path):
    # sklearn hidden from the import system, whether or not it is installed
    code = ("import sys; sys.modules['sklearn'] = None; sys.argv = ['prepare_digits.py', "
            f"'--out_dir', {str(tmp_path / 'd')!r}]; import prepare_digits, cli; "
            "cli.run_cli(prepare_digits.main)")
    assert_one_line_error(run(["-c", code]), "pip install scikit-learn")
    assert not (tmp_path / "d").exists()


def read_png(path: Path) -> np.ndarray:
    """An 8-bit greyscale PNG with filter 0 (what sample.write_png writes), CRCs checked."""
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        kind, body = blob[pos + 4 : pos + 8], blob[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", blob[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0) and b"IEND" in chunks
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, width + 1)
    assert np.all(raw[:, 0] == 0)
    return raw[:, 1:]


def test_write_png_round_trips(tmp_path):
    picture = np.arange(15 * 7, dtype=np.uint8).reshape(15, 7) * 2
    sample.write_png(tmp_path / "x.png", picture)
    np.testing.assert_array_equal(read_png(tmp_path / "x.png"), picture)


def test_image_grid_draws_each_level_as_ink():
    images = np.zeros((2, 3, 8, 8), int)
    images[1, 2, 0, 0] = 15  # full ink, top-left pixel of the last image
    grid = sample.image_grid(images, 16, scale=4, gap=2)
    assert grid.shape == (2 * (32 + 2) + 2, 3 * (32 + 2) + 2)
    y, x = 2 + 34, 2 + 2 * 34
    assert np.all(grid[y : y + 4, x : x + 4] == 0) and grid[y + 4, x + 4] == 255
    assert (grid == 0).sum() == 16


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A tiny run on synthetic label-prefixed digits, trained a few steps."""
    root = tmp_path_factory.mktemp("digits")
    code = ("import sys, numpy as np, prepare_digits, cli; "
            "rng = np.random.default_rng(0); "
            "prepare_digits.load_images = lambda: (rng.integers(0, 17, (60, 8, 8)), np.arange(60) % 10); "
            f"sys.argv = ['prepare_digits.py', '--out_dir', {str(root / 'data')!r}]; "
            "cli.run_cli(prepare_digits.main)")
    prepared = run(["-c", code])
    assert prepared.returncode == 0, prepared.stderr
    done = run(["launch.py", "--config=digits", f"--data_dir={root / 'data'}",
               f"--rundir={root / 'run'}", "--max_steps=4", "--warmup_steps=2", "--eval_interval=4",
               "--eval_iters=1", "--log_interval=2", "--model.n_layer=1", "--model.n_embd=32",
               "--batch_size=4"])
    assert done.returncode == 0, done.stderr
    return root / "run"


@pytest.mark.slow
def test_sample_writes_a_png_grid_of_pixel_images_one_row_per_label(digits_run, tmp_path):
    done = run(["sample.py", f"--rundir={digits_run}", "--num_samples=3", f"--out={tmp_path / 'all.png'}"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "checkpoint at step 4" in done.stderr
    grid = read_png(tmp_path / "all.png")
    assert grid.shape == (10 * 34 + 2, 3 * 34 + 2)  # 10 labels x 3 samples of 8x8 pixels, x4
    ink_levels = {255 - round(level * 255 / 15) for level in range(16)}
    assert set(np.unique(grid)) <= ink_levels  # every drawn token is a pixel level, no label
    one = run(["sample.py", f"--rundir={digits_run}", "--num_samples=2", "--start=7",
              f"--out={tmp_path / 'seven.png'}"])
    assert one.returncode == 0, one.stderr
    assert read_png(tmp_path / "seven.png").shape == (34 + 2, 2 * 34 + 2)
    assert_one_line_error(run(["sample.py", f"--rundir={digits_run}", "--start=x",
                              f"--out={tmp_path / 'x.png'}"]), "--start='x'", "class label")
    assert not (tmp_path / "x.png").exists()


def test_unconditional_images_start_from_the_start_token_and_draw_only_pixels(tmp_path):
    # a random model over 17 tokens would draw the start token (16) among 256 pixels: none may be
    config = GPTConfig(block_size=64, vocab_size=17, n_layer=1, n_head=2, n_embd=32,
                       compute_dtype="float32")
    model = GPT(config, key=jr.key(0))
    meta = {"image": {"height": 8, "width": 8, "levels": 16}, "labels": None, "start_token": 16}
    args = sample.parse_args(["--rundir", str(tmp_path), "--num_samples", "4",
                              "--out", str(tmp_path / "u.png")])
    images = sample.sample_images(args, model, meta, "a random model")
    assert images.shape == (1, 4, 8, 8) and images.max() < 16
    assert read_png(tmp_path / "u.png").shape == (34 + 2, 4 * 34 + 2)
    args.start = "3"
    with pytest.raises(UserError, match="no class labels"):
        sample.sample_images(args, model, meta, "a random model")
