"""OpenAI's GPT-2 weights in and out: Hugging Face's layout <-> this repo's GPT.

A GPT-2 checkpoint is a directory holding `config.json` and `model.safetensors` as Hugging Face
saves them (tensors named `transformer.h.0.attn.c_attn.weight`, ...; OpenAI's own upload has the
same names without `transformer.`, plus `attn.bias` mask buffers). `load` reads one into a GPT
with GPT2_ARCHITECTURE (model.py), strictly: every tensor used, none missing, every shape
checked. `save` writes a GPT-2-architecture model back, so `transformers` loads it. Both use
one table of names, so a load -> save -> load round trip is exact.

    python launch.py --config=finetune_shakespeare       # init_from="gpt2-xl" in the config
    python sample.py --init_from=gpt2 --start="ROMEO:"
    python export.py --rundir=runs/finetune --out=exported/
"""

import dataclasses
import json
import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from cli import UserError
from data import GPT2_BPE
from model import GPT, GPT2_ARCHITECTURE, GPTConfig, padded_vocab

HUB_NAMES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
FILES = ("config.json", "model.safetensors")

# Where each parameter of the GPT lives in the file: (getter, name); {i} is the layer, whose
# tensors are stacked on the leading axis of the block stack.
TENSORS = [
    (lambda m: m.embed, "wte.weight"),  # (vocab, d); rows past the file's vocab are padding
    (lambda m: m.pos_embed, "wpe.weight"),
    (lambda m: m.blocks.attn_norm.weight, "h.{i}.ln_1.weight"),
    (lambda m: m.blocks.attn_norm.bias, "h.{i}.ln_1.bias"),
    (lambda m: m.blocks.attn.qkv.weight, "h.{i}.attn.c_attn.weight"),  # (d, 3d): q | k | v
    (lambda m: m.blocks.attn.qkv.bias, "h.{i}.attn.c_attn.bias"),
    (lambda m: m.blocks.attn.proj.weight, "h.{i}.attn.c_proj.weight"),
    (lambda m: m.blocks.attn.proj.bias, "h.{i}.attn.c_proj.bias"),
    (lambda m: m.blocks.mlp_norm.weight, "h.{i}.ln_2.weight"),
    (lambda m: m.blocks.mlp_norm.bias, "h.{i}.ln_2.bias"),
    (lambda m: m.blocks.mlp.fc.weight, "h.{i}.mlp.c_fc.weight"),
    (lambda m: m.blocks.mlp.fc.bias, "h.{i}.mlp.c_fc.bias"),
    (lambda m: m.blocks.mlp.proj.weight, "h.{i}.mlp.c_proj.weight"),
    (lambda m: m.blocks.mlp.proj.bias, "h.{i}.mlp.c_proj.bias"),
    (lambda m: m.final_norm.weight, "ln_f.weight"),
    (lambda m: m.final_norm.bias, "ln_f.bias"),
]
# In OpenAI's upload but not parameters: the causal mask and its fill value, per layer.
BUFFERS = ("attn.bias", "attn.masked_bias")
# What GPT-2's config.json holds besides the architecture, which is GPT2_ARCHITECTURE ...
IN_GPT2_CONFIG = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "norm_eps")
# ... and the GPTConfig fields that say how the same weights are computed or trained, not what
# they compute: a run keeps its own when GPT-2's weights load, and exports with any of them.
HOW_COMPUTED = ("dropout", "attn_dropout", "attention", "remat", "unroll_layers", "compute_dtype")


def resolve(source: str) -> Path:
    """A local directory with config.json and model.safetensors, or a GPT-2 name fetched from
    the Hugging Face hub (its cache first, so a second use needs no network)."""
    path = Path(source)
    if path.is_dir():
        missing = [f for f in FILES if not (path / f).is_file()]
        if missing:
            raise UserError(f"{path} has no {' or '.join(missing)}: init_from needs a directory "
                            "with config.json and model.safetensors in Hugging Face's GPT-2 layout")
        return path
    if source not in HUB_NAMES:
        raise UserError(f"init_from={source}: no such directory; use a local GPT-2 directory or "
                        f"one of {', '.join(HUB_NAMES)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"init_from={source} downloads through huggingface_hub, which is not "
                        "installed: pip install huggingface_hub, or pass a local directory") from None
    try:
        return Path(snapshot_download(HUB_NAMES[source], allow_patterns=list(FILES)))
    except Exception as e:  # offline, hub down, no such file: all mean the same here
        raise UserError(f"cannot download {source} from the Hugging Face hub ({type(e).__name__}): "
                        "without a network, pass a local directory holding config.json and "
                        "model.safetensors") from None


def read_config(directory: Path) -> tuple[GPTConfig, int]:
    """(the GPTConfig of the checkpoint, with its vocabulary padded; the file's vocab_size)."""
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{directory / 'config.json'} cannot be read ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{directory / 'config.json'} holds a JSON {type(hf).__name__}, not the "
                        "object of Hugging Face's GPT-2 config: check --init_from")
    unsupported = {"model_type": "gpt2", "activation_function": "gelu_new",
                   "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                   "reorder_and_upcast_attn": False, "tie_word_embeddings": True}
    for key, expected in unsupported.items():
        if hf.get(key, expected) != expected:
            raise UserError(f"{directory / 'config.json'}: {key}={hf.get(key)!r}, but only GPT-2's "
                            f"{key}={expected!r} loads: this is another architecture")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        raise UserError(f"{directory / 'config.json'}: n_inner={hf['n_inner']} is not 4 x n_embd")
    try:
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=padded_vocab(hf["vocab_size"]),
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           **{**GPT2_ARCHITECTURE, "norm_eps": hf["layer_norm_epsilon"]})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{directory / 'config.json'} is not a GPT-2 config ({e!r})") from None
    return config, hf["vocab_size"]


def read_tokenizer(directory: Path) -> dict | None:
    """What the model's token ids mean (data.tokenizer_of): as export.py recorded it in
    config.json, else GPT-2's BPE for GPT-2's vocabulary; None when neither says."""
    hf = json.loads((directory / "config.json").read_text())
    if isinstance(hf.get("eqxgpt_tokenizer"), dict):
        return hf["eqxgpt_tokenizer"]
    return dict(GPT2_BPE) if hf.get("vocab_size") == GPT2_BPE["vocab_size"] else None


def load(source: str, config: GPTConfig | None = None) -> tuple[GPT, int]:
    """(the GPT with the checkpoint's weights, float32; the file's vocab_size). config: the
    settings that do not change the weights (dropout, compute_dtype, ...) to keep."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = resolve(source)
    shapes, vocab = read_config(directory)
    if config is not None:
        shapes = with_shapes_of(config, shapes)
    try:
        tensors = load_file(directory / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{directory / 'model.safetensors'} cannot be read ({e}): a truncated "
                        "or damaged download? fetch it again") from None
    tensors = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, tensors.get("wte.weight")):
        raise UserError(f"{directory}: lm_head.weight differs from wte.weight; only GPT-2's tied "
                        "head loads")
    for layer in range(shapes.n_layer):
        for buffer in BUFFERS:
            tensors.pop(f"h.{layer}.{buffer}", None)

    abstract = eqx.filter_eval_shape(GPT, shapes, key=jr.key(0))
    arrays = []
    for get, name in TENSORS:
        expected = get(abstract).shape
        names = [name.format(i=i) for i in range(shapes.n_layer)] if "{i}" in name else [name]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise UserError(f"{directory / 'model.safetensors'} has no tensor {missing[0]}: not a "
                            f"complete GPT-2 of config.json's {shapes.n_layer} layers")
        parts = [np.asarray(tensors.pop(n), np.float32) for n in names]
        if name == "wte.weight" and parts[0].shape[0] == vocab:  # pad rows: never sampled
            padding = np.zeros((expected[0] - vocab, parts[0].shape[1]), np.float32)
            parts[0] = np.concatenate([parts[0], padding])
        per_part = expected[1:] if "{i}" in name else expected
        for part_name, part in zip(names, parts):
            if part.shape != per_part:
                raise UserError(f"{directory / 'model.safetensors'}: {part_name} has shape "
                                f"{part.shape}, config.json says {per_part}")
        arrays.append(jnp.asarray(np.stack(parts) if "{i}" in name else parts[0]))
    if tensors:
        raise UserError(f"{directory / 'model.safetensors'} has tensors a GPT-2 does not: "
                        f"{', '.join(sorted(tensors)[:3])}: another architecture?")
    getters = lambda m: [get(m) for get, _ in TENSORS]  # noqa: E731
    return eqx.tree_at(getters, abstract, arrays), vocab


def with_shapes_of(config: GPTConfig, checkpoint: GPTConfig) -> GPTConfig:
    """The checkpoint's shapes and whole architecture, with config's settings of how to compute
    them (dropout, compute_dtype, ...): a switch of config's that GPT-2 lacks is not kept."""
    return dataclasses.replace(checkpoint, **{name: getattr(config, name) for name in HOW_COMPUTED})


def not_in_gpt2_layout(config: GPTConfig) -> list[str]:
    """The settings of config ("name=value") that GPT-2's layout cannot hold: every field neither
    in GPT-2's config.json nor only about how the weights are computed must be GPT-2's own, so a
    new switch is compared too, not only those GPT2_ARCHITECTURE lists."""
    gpt2 = dataclasses.replace(type(config)(), **GPT2_ARCHITECTURE)
    return [f"{field.name}={getattr(config, field.name)!r}" for field in dataclasses.fields(config)
            if field.name not in (*IN_GPT2_CONFIG, *HOW_COMPUTED)
            and getattr(config, field.name) != getattr(gpt2, field.name)]


def save(model: GPT, out_dir: Path, vocab_size: int, tokenizer: dict | None = None) -> None:
    """Writes config.json and model.safetensors in Hugging Face's GPT-2 layout (the padding rows
    of the vocabulary past vocab_size dropped), both with the permissions of any new file.
    tokenizer: what the token ids mean (data.tokenizer_of), kept in config.json for sample.py
    and eval.py (transformers ignores the key)."""
    from safetensors.numpy import save_file

    config = model.config
    if changed := not_in_gpt2_layout(config):
        raise UserError(f"only a GPT-2-architecture model exports to GPT-2's layout; this one has "
                        f"{', '.join(changed)}")
    written = {id(get(model)) for get, _ in TENSORS}
    left_out = [jax.tree_util.keystr(path) for path, array in
                jax.tree_util.tree_leaves_with_path(eqx.filter(model, eqx.is_array))
                if id(array) not in written]
    if left_out:  # an array no GPT-2 tensor holds: the model is more than GPT-2
        raise UserError(f"GPT-2's layout has no tensor for the model's {', '.join(left_out)}: only "
                        "a GPT-2-architecture model exports")
    tensors = {}
    for get, name in TENSORS:
        array = np.asarray(jax.device_get(get(model)), np.float32)
        if name == "wte.weight":
            array = array[:vocab_size]
        if "{i}" in name:
            tensors.update({f"transformer.{name.format(i=i)}": np.ascontiguousarray(array[i])
                            for i in range(config.n_layer)})
        else:
            tensors[f"transformer.{name}"] = np.ascontiguousarray(array)
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
        "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
        "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": 50256, "eos_token_id": 50256,
        **({"eqxgpt_tokenizer": tokenizer} if tokenizer else {}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)  # safetensors writes 0600; a model is shared like config.json (0666 - umask)
    os.umask(umask)
    os.chmod(out_dir / "model.safetensors", 0o666 & ~umask)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
