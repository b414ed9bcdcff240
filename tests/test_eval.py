"""eval.py and evaluation.py: a whole split's loss, HellaSwag against transformers' scores, task
accuracy during training, bad input.

../shared/data/tiny-gpt2 holds a small random GPT-2, a 12-item HellaSwag fixture and the scores
transformers' GPT2LMHeadModel gives it under build-nanogpt's rule (hellaswag_reference.json).
"""

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import data
import eval as eval_py
import evaluation
import gpt2
import prepare_addition
import prepare_shakespeare
import train
from cli import UserError, run_cli
from conftest import SHARED
from config import TrainConfig
from model import GPT, GPTConfig, with_config
from test_train import assert_one_line_error, run, scalars, tiny_config

TINY_GPT2 = SHARED / "data" / "tiny-gpt2"
FIXTURE = TINY_GPT2 / "hellaswag_fixture.jsonl"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory, shakespeare_input) -> Path:
    """The first 10,000 characters of Tiny Shakespeare in GPT-2's BPE: a small model of a user's
    data (val about 250 tokens), quick to score with a 50,257-token vocabulary on a CPU."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "start.txt").write_text(shakespeare_input.read_text()[:10_000])
    prepare_shakespeare.main(["--input", str(folder / "start.txt"), "--tokenizer", "gpt2",
                              "--out_dir", str(folder / "shakespeare")])
    return folder / "shakespeare"


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory, shakespeare_input) -> Path:
    """The first 100,000 characters at character level: a val split of 10,000 tokens. Scoring
    all 111,540 of the whole play's, three times, made the test 14.5 s instead of 8.2 (AVX2 VM)."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "start.txt").write_text(shakespeare_input.read_text()[:100_000])
    prepare_shakespeare.main(["--input", str(folder / "start.txt"), "--out_dir",
                              str(folder / "shakespeare_char")])
    return folder / "shakespeare_char"


def small_model(vocab=50, block=8) -> GPT:
    config = GPTConfig(block_size=block, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16,
                       compute_dtype="float32")
    return GPT(config, key=jr.key(0))


def compiles_of(caplog, name: str) -> int:
    return sum(f"jit({name})" in r.message for r in caplog.records
               if r.message.startswith("Compiling"))


# ---------------------------------------------------------------------------------------------
# HellaSwag


def test_hellaswag_scores_are_transformers(tmp_path):
    out = tmp_path / "results.json"
    eval_py.main([f"--init_from={TINY_GPT2}", f"--hellaswag={FIXTURE}", f"--out={out}"])
    reference = json.loads((TINY_GPT2 / "hellaswag_reference.json").read_text())
    written = json.loads(out.read_text())["hellaswag"]
    assert len(written["examples"]) == len(reference["examples"]) == 12
    for ours, theirs in zip(written["examples"], reference["examples"]):
        assert (ours["ind"], ours["pred"], ours["pred_norm"]) == (
            theirs["ind"], theirs["pred"], theirs["pred_norm"])
        np.testing.assert_allclose(ours["sum_loss"], theirs["sum_loss"], atol=1e-3, rtol=0)
        np.testing.assert_allclose(ours["mean_loss"], theirs["mean_loss"], atol=1e-3, rtol=0)
    assert (written["acc"], written["acc_norm"]) == (reference["acc"], reference["acc_norm"])


def test_hellaswag_compiles_a_few_widths_whatever_the_number_of_items(caplog):
    model, vocab = gpt2.load(str(TINY_GPT2))
    items = evaluation.read_hellaswag(str(FIXTURE), model.config.block_size)
    long_ctx = {**items[0], "ctx": items[0]["ctx"] * 6}  # padded to another width
    widths = {evaluation.padded_width(item, 128) for item in (*items, long_ctx)}
    assert len(widths) == 2
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        few = evaluation.hellaswag_scores(model, [items[0], long_ctx], 2, vocab)
        first = compiles_of(caplog, "row_losses")
        many = evaluation.hellaswag_scores(model, [*items, long_ctx] * 3, 2, vocab)
    assert first == 2 and compiles_of(caplog, "row_losses") == first  # 39 items, no new shape
    # batch-mates and padding change nothing
    assert many["examples"][0]["sum_loss"] == pytest.approx(few["examples"][0]["sum_loss"], abs=1e-4)
    assert many["examples"][12]["sum_loss"] == pytest.approx(few["examples"][1]["sum_loss"], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# A whole split


def plain_loop_loss(model: GPT, tokens: np.ndarray) -> tuple[float, int]:
    """Summed cross entropy and count over non-overlapping windows, one forward each."""
    block, total, count = model.config.block_size, 0.0, 0
    forward = jax.jit(lambda m, x: m(x))
    for start in range(0, len(tokens) - 1, block):
        window = jnp.asarray(tokens[start : start + block + 1])
        log_probs = jax.nn.log_softmax(forward(model, window[:-1]))
        total -= float(jnp.take_along_axis(log_probs, window[1:, None], axis=1).sum())
        count += len(window) - 1
    return total, count


def test_whole_split_loss_is_a_plain_loop_over_windows_with_the_partial_last_one():
    model = small_model()
    tokens = np.asarray(jr.randint(jr.key(1), (8 * 7 + 4,), 0, 50))  # 59 targets: 7 windows + 3
    byte_lengths = np.arange(50) % 3 + 1
    result = evaluation.split_loss(model, tokens, batch_size=3, byte_lengths=byte_lengths)
    total, count = plain_loop_loss(model, tokens)
    assert result["tokens"] == count == len(tokens) - 1
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["bytes"] == byte_lengths[tokens[1:]].sum()  # the predicted tokens' bytes
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / result["bytes"], rel=1e-5)


def test_whole_split_compiles_once_whatever_its_length(caplog):
    model = small_model()
    tokens = np.asarray(jr.randint(jr.key(2), (500,), 0, 50))
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        evaluation.split_loss(model, tokens[:20], batch_size=4)
        evaluation.split_loss(model, tokens, batch_size=4)  # 63 windows: 16 batches, the last short
    assert compiles_of(caplog, "row_losses") == 1


def test_bytes_are_utf8_bytes_for_both_tokenizers():
    text = "Où est l'été? 東京 — naïve"
    bpe = data.GPT2Tokenizer()
    lengths = evaluation.token_byte_lengths({"tokenizer": "gpt2"})
    assert lengths[bpe.encode(text)].sum() == len(text.encode("utf-8"))
    chars = "".join(sorted(set(text)))
    char_lengths = evaluation.token_byte_lengths({"tokenizer": "char", "chars": chars})
    assert char_lengths[data.CharTokenizer(chars).encode(text)].sum() == len(text.encode("utf-8"))
    assert evaluation.token_byte_lengths({"tokenizer": "pixels"}) is None


def test_tokens_past_the_vocab_limit_are_left_out_of_the_softmax():
    model = small_model(vocab=50)  # as GPT-2's 50257 ids in a vocabulary padded to 50304
    tokens = np.asarray(jr.randint(jr.key(3), (9,), 0, 40))
    log_probs = jax.nn.log_softmax(model(jnp.asarray(tokens[:-1]))[:, :40])
    expected = -jnp.take_along_axis(log_probs, jnp.asarray(tokens[1:, None]), axis=1).mean()
    result = evaluation.split_loss(model, tokens, 2, vocab_limit=40)
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_eval_py_scores_every_val_token_of_the_checkpoint_asked_for(char_dir, tmp_path):
    config = tiny_config(str(char_dir), max_steps=4, eval_interval=2)
    trained = train.train(config, tmp_path / "run")
    latest = eval_py.main([f"--rundir={tmp_path / 'run'}", "--checkpoint=latest", "--batch_size=64"])
    earlier = eval_py.main([f"--rundir={tmp_path / 'run'}", "--checkpoint=2", "--batch_size=64"])
    meta = data.load_meta(char_dir)
    val = data.open_split(char_dir, "val", meta)
    assert latest["model"].endswith("(checkpoint at step 4)")
    assert latest["loss"]["tokens"] == meta["val_tokens"] - 1
    expected = evaluation.split_loss(trained, val, 64)["loss"]
    assert latest["loss"]["loss"] == pytest.approx(expected, rel=1e-6) != earlier["loss"]["loss"]
    # Tiny Shakespeare is ASCII: a byte a character, so bits per byte is the loss in bits
    assert latest["loss"]["bits_per_byte"] == pytest.approx(latest["loss"]["loss"] / math.log(2))


def test_gpt2_on_bpe_data_counts_the_bytes_of_the_predicted_text(bpe_dir):
    results = eval_py.main([f"--init_from={TINY_GPT2}", f"--data_dir={bpe_dir}"])["loss"]
    val = np.asarray(data.open_split(bpe_dir, "val", data.load_meta(bpe_dir)))
    assert results["tokens"] == len(val) - 1
    assert results["bytes"] == len(data.GPT2Tokenizer().enc.decode_bytes(val[1:].tolist()))
    model, vocab = gpt2.load(str(TINY_GPT2))
    model = with_config(model, dataclasses.replace(model.config, compute_dtype="float32"))
    expected = evaluation.split_loss(model, val, 8, vocab_limit=vocab)["loss"]
    assert results["loss"] == pytest.approx(expected, rel=1e-6)
    assert results["bits_per_byte"] == pytest.approx(
        results["loss"] * results["tokens"] / math.log(2) / results["bytes"])


# ---------------------------------------------------------------------------------------------
# Task accuracy during training


def test_exact_match_is_measured_at_every_eval_interval_and_by_eval_py(tmp_path):
    prepare_addition.main(["--digits", "1", "--out_dir", str(tmp_path / "add1")])
    config = dataclasses.replace(
        tiny_config(str(tmp_path / "add1"), max_steps=10, eval_interval=5, batch_size=16),
        model=GPTConfig(block_size=3, vocab_size=10, n_layer=1, n_head=2, n_embd=32,
                        compute_dtype="float32"))
    model = train.train(config, tmp_path / "run")
    events = scalars(tmp_path / "run")["eval/exact_match"]
    assert sorted(events) == [5, 10]
    results = eval_py.main([f"--rundir={tmp_path / 'run'}", "--checkpoint=10"])
    assert results["exact_match"]["total"] == 10  # 1-digit: 10 val problems
    assert results["exact_match"]["accuracy"] == pytest.approx(events[10], abs=1e-6)
    meta = data.load_meta(tmp_path / "add1")
    examples = np.asarray(data.open_split(tmp_path / "add1", "val", meta)).reshape(-1, 4)
    correct, _ = evaluation.completion_accuracy(model, examples, 2, vocab_limit=10)  # prompt: a, b
    assert results["exact_match"]["correct"] == correct


def test_hellaswag_in_training_is_scored_at_each_eval(bpe_dir, tmp_path):
    model, _ = gpt2.load(str(TINY_GPT2))
    config = TrainConfig(
        data_dir=str(bpe_dir), init_from=str(TINY_GPT2), hellaswag=str(FIXTURE),
        model=dataclasses.replace(model.config, compute_dtype="float32"), batch_size=4,
        max_steps=2, warmup_steps=1, eval_interval=1, eval_iters=1, log_interval=1,
        learning_rate=1e-4, min_lr=1e-5)
    trained = train.train(config, tmp_path / "run")
    events = scalars(tmp_path / "run")
    assert sorted(events["eval/hellaswag_acc_norm"]) == [1, 2] == sorted(events["eval/hellaswag_acc"])
    items = evaluation.read_hellaswag(str(FIXTURE), 128)
    final = evaluation.hellaswag_scores(trained, items, 1, vocab_limit=50257)
    assert events["eval/hellaswag_acc_norm"][2] == pytest.approx(final["acc_norm"])
    # a bad file is refused before anything is written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "x", "endings": ["a", "b"], "label": 0}\n')
    with pytest.raises(UserError, match="line 1"):
        train.train(dataclasses.replace(config, hellaswag=str(bad)), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


# ---------------------------------------------------------------------------------------------
# Bad input


def bad_lines(tmp_path) -> dict[str, tuple[str, str]]:
    """A file name -> (its content, a word the error must hold)."""
    item = json.loads(FIXTURE.read_text().splitlines()[0])
    return {
        "not_json.jsonl": ("{not json\n", "line 1"),
        "three_endings.jsonl": (json.dumps({**item, "endings": item["endings"][:3]}), "endings"),
        "no_label.jsonl": (json.dumps({k: v for k, v in item.items() if k != "label"}), "label"),
        "too_long.jsonl": (json.dumps({**item, "ctx": "and so on " * 60}), "block_size"),
        "empty.jsonl": ("\n", "no items"),
    }


def test_bad_files_and_arguments_are_one_line_exit_2_and_write_nothing(char_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("kept")
    cases = [[f"--init_from={TINY_GPT2}", f"--hellaswag={tmp_path / 'missing.jsonl'}"],
             [f"--init_from={TINY_GPT2}", "--rundir=somewhere"],
             [f"--init_from={TINY_GPT2}"],
             [f"--init_from={TINY_GPT2}", f"--data_dir={char_dir}"],
             [f"--init_from={TINY_GPT2}", f"--hellaswag={FIXTURE}", "--batch_size=0"],
             [f"--init_from={TINY_GPT2}", f"--hellaswag={FIXTURE}", f"--out={tmp_path}"]]
    for name, (content, _) in bad_lines(tmp_path).items():
        (tmp_path / name).write_text(content)
        cases.append([f"--init_from={TINY_GPT2}", f"--hellaswag={tmp_path / name}"])
    words = [None] * 6 + [word for _, word in bad_lines(tmp_path).values()]
    for argv, word in zip(cases, words):
        with pytest.raises(SystemExit) as exit_:
            run_cli(lambda: eval_py.main([*argv, f"--out={out}"] if "--out" not in str(argv)
                                         else argv))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith("error: ") and (word is None or word in err), (argv, err)
        assert out.read_text() == "kept", argv
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*bad_lines(tmp_path), out.name])
    # the script itself: the same line on stderr, no traceback
    assert_one_line_error(run(["eval.py", f"--init_from={TINY_GPT2}",
                               f"--hellaswag={tmp_path / 'not_json.jsonl'}"]), "line 1")
