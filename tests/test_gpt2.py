"""GPT-2 weights: loading against transformers' own logits, strictness, export, fine-tuning.

../shared/data/tiny-gpt2 is a small random GPT-2 in Hugging Face's layout with the logits and
the greedy continuation that transformers' GPT2LMHeadModel computes from it (float32, CPU).
Comparisons are in float32 (conftest.py asks for float32 matmuls on GPUs too).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import checkpoints
import export
import gpt2
import launch
import optim
import prepare_shakespeare
from cli import UserError
from conftest import SHARED
from config import TrainConfig
from decode import generate
from model import GPT, GPT2_ARCHITECTURE, GPTConfig, empty_cache, extend, with_config
from test_bad_input import one_line_error

REPO = Path(__file__).resolve().parents[1]
TINY_GPT2 = SHARED / "data" / "tiny-gpt2"


@pytest.fixture(scope="module")
def reference() -> dict:
    assert TINY_GPT2.is_dir(), f"{TINY_GPT2} is missing: tests need ../shared beside the repo"
    return json.loads((TINY_GPT2 / "reference.json").read_text())


@pytest.fixture(scope="module")
def loaded():
    model, vocab = gpt2.load(str(TINY_GPT2))
    return with_config(model, dataclasses.replace(model.config, compute_dtype="float32")), vocab


def arrays(model) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


def test_logits_match_transformers(loaded, reference):
    model, vocab = loaded
    assert (vocab, model.config.vocab_size) == (50257, 50304)  # padded to a multiple of 64
    logits = jax.jit(lambda m, t: m(t))(model, jnp.array(reference["tokens"]))
    expected = np.load(TINY_GPT2 / reference["logits_file"])
    assert np.abs(expected).max() > 10  # the logits reach about +-16
    np.testing.assert_allclose(np.asarray(logits)[:, :vocab], expected, atol=1e-3, rtol=0)


def test_greedy_continuation_is_transformers_exactly(loaded, reference):
    model, vocab = loaded
    out = generate(model, jnp.array(reference["greedy_prompt"]), jr.key(0),
                   len(reference["greedy_continuation"]), temperature=0.0, vocab_limit=vocab)
    assert [int(t) for t in out] == reference["greedy_continuation"]


def test_cached_decoding_with_learned_positions_equals_the_full_forward(loaded, reference):
    model, _ = loaded
    tokens = jnp.array(reference["tokens"])
    full = model(tokens)
    step = eqx.filter_jit(extend)  # one compile per shape: prefill, then one token
    logits, cache = step(model, tokens[:5], empty_cache(model.config))
    steps = [logits]
    for t in tokens[5:]:
        logits, cache = step(model, t[None], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4, rtol=0)


def test_save_then_load_is_bit_for_bit_and_names_as_transformers(loaded, tmp_path):
    model, vocab = loaded
    gpt2.save(model, tmp_path, vocab)
    assert set(load_file(tmp_path / "model.safetensors")) == set(load_file(TINY_GPT2 / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((TINY_GPT2 / "config.json").read_text())
    for key in ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                "layer_norm_epsilon", "activation_function", "tie_word_embeddings"):
        assert config[key] == original[key], key
    again, again_vocab = gpt2.load(str(tmp_path))
    assert again_vocab == vocab
    for a, b in zip(arrays(model), arrays(again)):
        np.testing.assert_array_equal(a, b)


def test_export_refuses_whatever_gpt2s_layout_cannot_hold(loaded, tmp_path):
    model, vocab = loaded
    config = model.config
    # how the weights are computed or trained is no part of the layout
    assert gpt2.not_in_gpt2_layout(dataclasses.replace(
        config, dropout=0.1, compute_dtype="bfloat16", remat=True, block_size=64)) == []
    # a switch GPT2_ARCHITECTURE lists, one it does not, and a new one it has never heard of
    assert gpt2.not_in_gpt2_layout(dataclasses.replace(config, qk_norm=True)) == ["qk_norm=True"]
    assert gpt2.not_in_gpt2_layout(dataclasses.replace(config, rope_base=500.0)) == ["rope_base=500.0"]
    with_switch = dataclasses.make_dataclass("WithSwitch", [("value_embeddings", bool, False)],
                                             bases=(GPTConfig,), frozen=True)
    assert gpt2.not_in_gpt2_layout(with_switch(**dataclasses.asdict(config))) == []
    assert gpt2.not_in_gpt2_layout(with_switch(**dataclasses.asdict(config), value_embeddings=True)) \
        == ["value_embeddings=True"]
    # an array no GPT-2 tensor holds is refused by name, and nothing is written
    untied = eqx.tree_at(lambda m: m.lm_head, model, jnp.zeros((config.n_embd, config.vocab_size)),
                         is_leaf=lambda x: x is None)
    with pytest.raises(UserError, match=r"no tensor for the model's \.lm_head"):
        gpt2.save(untied, tmp_path / "out", vocab)
    assert not (tmp_path / "out").exists()


def test_openai_names_with_mask_buffers_and_an_explicit_tied_head_load(loaded, tmp_path):
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(TINY_GPT2 / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
    tensors["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(TINY_GPT2 / "config.json", tmp_path / "config.json")
    model, _ = gpt2.load(str(tmp_path))
    for a, b in zip(arrays(loaded[0]), arrays(model)):
        np.testing.assert_array_equal(a, b)


def broken_copy(tmp_path, change_tensors=None, change_config=None, truncate=False,
                raw_config=None) -> str:
    tensors = load_file(TINY_GPT2 / "model.safetensors")
    config = json.loads((TINY_GPT2 / "config.json").read_text())
    if change_tensors:
        change_tensors(tensors)
    if change_config:
        change_config(config)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(raw_config or json.dumps(config))
    if truncate:
        data = (tmp_path / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return str(tmp_path)


BROKEN = {
    "missing tensor": (dict(change_tensors=lambda t: t.pop("transformer.h.1.mlp.c_fc.bias")),
                       "has no tensor h.1.mlp.c_fc.bias"),
    "extra tensor": (dict(change_tensors=lambda t: t.update({"transformer.h.0.attn.q_norm": np.ones(16, np.float32)})),
                     "tensors a GPT-2 does not"),
    "wrong shape": (dict(change_tensors=lambda t: t.update({"transformer.h.0.ln_1.weight": np.ones(32, np.float32)})),
                    "ln_1.weight has shape"),
    "untied head": (dict(change_tensors=lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1})),
                    "tied head"),
    "other architecture": (dict(change_config=lambda c: c.update(model_type="llama")),
                           "another architecture"),
    "more layers than the file": (dict(change_config=lambda c: c.update(n_layer=3)), "has no tensor h.2"),
    "truncated file": (dict(truncate=True), "cannot be read"),
    "config.json not an object": (dict(raw_config="[1, 2]"), "holds a JSON list, not the object"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_file_that_is_not_this_gpt2_is_refused_in_one_line(case, tmp_path):
    changes, words = BROKEN[case]
    with pytest.raises(UserError, match=words) as error:
        gpt2.load(broken_copy(tmp_path, **changes))
    assert "\n" not in str(error.value)


def test_a_directory_without_the_files_or_an_unknown_name_is_refused(tmp_path):
    with pytest.raises(UserError, match="config.json or model.safetensors"):
        gpt2.load(str(tmp_path))
    with pytest.raises(UserError, match="gpt2, gpt2-medium"):
        gpt2.load("gpt-5")


def test_gpt2_architecture_decays_matrices_only_and_counts_flops_without_positions():
    config = GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=32,
                       **GPT2_ARCHITECTURE)
    model = eqx.filter_eval_shape(GPT, config, key=jr.key(0))
    labels = optim.optimizer_labels(TrainConfig())(model)
    assert labels.blocks.attn.qkv.bias == labels.blocks.attn_norm.bias == "no_decay"
    assert labels.blocks.attn_norm.weight == labels.final_norm.bias == "no_decay"
    assert labels.blocks.attn.qkv.weight == labels.pos_embed == labels.embed == "decay"
    from model import flops_per_token, num_params
    n = num_params(model, non_embedding=True)
    assert n == num_params(model) - 128 * 32 - 64 * 32  # neither embedding is a matmul
    # the matrices a token is multiplied by (not the biases and gains), the tied head among them
    assert flops_per_token(config) == 6 * (2 * 12 * 32 * 32 + 128 * 32) + 12 * 2 * 32 * 64


# ---------------------------------------------------------------------------------------------
# The scripts: sample.py --init_from, launch.py --init_from (fine-tuning), export.py


def run(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_sample_py_from_gpt2_weights_is_transformers_greedy(reference):
    import data

    tokenizer = data.GPT2Tokenizer()
    prompt = tokenizer.decode(reference["greedy_prompt"])
    assert tokenizer.encode(prompt) == reference["greedy_prompt"]
    done = run("sample.py", f"--init_from={TINY_GPT2}", f"--start={prompt}", "--temperature=0",
               "--num_samples=1", f"--max_new_tokens={len(reference['greedy_continuation'])}")
    assert done.returncode == 0, done.stderr
    expected = tokenizer.decode(reference["greedy_prompt"] + reference["greedy_continuation"])
    assert done.stdout.split("\n---------------\n")[0] == expected


@pytest.mark.slow
def test_fine_tune_from_gpt2_then_export_loads_back_bit_for_bit(tmp_path, shakespeare_input):
    data_dir = tmp_path / "shakespeare"
    prepared = run("prepare_shakespeare.py", "--tokenizer=gpt2", f"--input={shakespeare_input}",
                   f"--out_dir={data_dir}")
    assert prepared.returncode == 0, prepared.stderr
    rundir = tmp_path / "run"
    # A learning rate of 1e-9 barely moves the weights: the run must have started from GPT-2's.
    done = run("launch.py", "--config=finetune_shakespeare", f"--init_from={TINY_GPT2}",
               f"--data_dir={data_dir}", f"--rundir={rundir}", "--max_steps=2", "--batch_size=2",
               "--grad_accum=1", "--eval_interval=2", "--eval_iters=1", "--learning_rate=1e-9",
               "--min_lr=0", "--model.compute_dtype=float32")
    assert done.returncode == 0, done.stderr
    saved = json.loads((rundir / "config.json").read_text())["config"]
    assert saved["model"]["n_layer"] == 2 and saved["model"]["position_embedding"] == "learned"
    _, tuned, _ = checkpoints.load_model(rundir)
    original, _ = gpt2.load(str(TINY_GPT2))
    for a, b in zip(arrays(original), arrays(tuned)):
        np.testing.assert_allclose(a, b, atol=1e-6)

    exported = run("export.py", f"--rundir={rundir}", f"--out={tmp_path / 'out'}")
    assert exported.returncode == 0, exported.stderr
    back, vocab = gpt2.load(str(tmp_path / "out"))
    assert vocab == 50257
    # The 47 padding rows of the vocabulary (trained through the tied head) are not exported.
    np.testing.assert_array_equal(tuned.embed[:vocab], back.embed[:vocab])
    np.testing.assert_array_equal(back.embed[vocab:], 0)
    for a, b in zip(arrays(eqx.tree_at(lambda m: m.embed, tuned, None)),
                    arrays(eqx.tree_at(lambda m: m.embed, back, None))):
        np.testing.assert_array_equal(a, b)
    again = run("export.py", f"--rundir={rundir}", f"--out={tmp_path / 'out'}")
    assert again.returncode == 2 and "--overwrite" in again.stderr  # nothing overwritten


@pytest.mark.slow
def test_init_from_errors_are_one_line(tmp_path, shakespeare_input, capsys):
    # A name, with no network and an empty cache: processes, as Hugging Face's hub reads its
    # offline switch when first imported
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for args in (["launch.py", "--config=finetune_shakespeare", "--init_from=gpt2"],
                 ["sample.py", "--init_from=gpt2-medium"]):
        done = run(*args, env=offline)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
        assert "local directory" in lines[0], lines[0]
    # The rest need no network: in this process, as the scripts run them
    char_dir = tmp_path / "chars"
    prepare_shakespeare.main([f"--input={shakespeare_input}", f"--out_dir={char_dir}"])
    capsys.readouterr()
    one_line_error(lambda: launch.main([
        "--config=finetune_shakespeare", f"--init_from={TINY_GPT2}", f"--data_dir={char_dir}",
        f"--rundir={tmp_path / 'run'}"]), capsys, "--tokenizer gpt2")
    one_line_error(lambda: export.main([f"--rundir={tmp_path / 'nothing'}",
                                        f"--out={tmp_path / 'out'}"]), capsys, "not a run directory")
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
