"""Every setting is read, and does what its name says.

The settings are the fields of TrainConfig and, under "model.", of GPTConfig, listed from
dataclasses.fields: a field added later joins the list by itself, and test_every_setting_is_covered
fails for it until it has an entry in CHANGES (another valid value and what that must change,
observed here) or in OBSERVED_ELSEWHERE (why it cannot be observed here, and the test that does).

test_changing_a_setting_changes_what_it_names sets one field of BASE to its CHANGES value and
compares what the field claims to change against BASE: the optimizer's updates (or its loss
scale) over six steps of fixed gradients, the learning-rate schedule, the multi-token weights,
the model's shapes, its output (inference, or training's, with dropout) or its traced program,
the batches and evaluation batches, the initial state, the FSDP placements, or a short training
run's log and kept checkpoints. BASE is TrainConfig's defaults with a tiny model and run (so the file stays
fast); a context (say optimizer="muon" for Muon's settings) is applied to both sides.
Observations are cached: each base is computed once.
"""

import ast
import dataclasses
import itertools
import re
from pathlib import Path
from typing import Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh

import checkpoints
import data
import gpt2
import optim
import prepare_shakespeare
import sharding
import train
from config import TrainConfig
from model import GPT, GPT2_ARCHITECTURE, GPTConfig, LayerNorm, RMSNorm, forward, loss_fn

TESTS = Path(__file__).resolve().parent
NORMS = (RMSNorm, LayerNorm)


def setting_names(config, prefix: str = "") -> list[str]:
    """Every field of a config, a nested config's as "model.name", as launch.py names them."""
    names = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            names += setting_names(value, f"{prefix}{field.name}.")
        else:
            names.append(prefix + field.name)
    return names


def with_setting(config: TrainConfig, name: str, value) -> TrainConfig:
    """config with one field changed; "model.x" changes the model's."""
    if name.startswith("model."):
        model = dataclasses.replace(config.model, **{name.removeprefix("model."): value})
        return dataclasses.replace(config, model=model)
    return dataclasses.replace(config, **{name: value})


def get_setting(config: TrainConfig, name: str):
    owner = config.model if name.startswith("model.") else config
    return getattr(owner, name.removeprefix("model."))


# The tiny model and run every observation starts from: TrainConfig's defaults, except its sizes,
# the run's length, and a peak learning rate at which 4 steps visibly lower the loss.
TINY = GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16,
                 compute_dtype="float32")
BASE_CHANGES = dict(model=TINY, batch_size=2, learning_rate=1e-2, min_lr=1e-3, warmup_steps=2,
                    max_steps=4, eval_interval=1, eval_iters=1, log_interval=1, profile_steps=2)


class Change(NamedTuple):
    """Another valid value of a setting, the observations it must change (see OBSERVERS), and
    the other settings both sides take (a Muon setting acts only with optimizer="muon")."""
    value: object
    changes: tuple[str, ...]
    context: dict = {}


MUON = {"optimizer": "muon"}
TWO_LAYERS = dataclasses.replace(TINY, n_layer=2)
FLOAT16 = {"model": dataclasses.replace(TINY, compute_dtype="float16")}  # loss scaling's only use
CHANGES = {
    "data_dir": Change("other", ("batches.train", "batches.eval")),  # another corpus (fixture)
    "batch_size": Change(4, ("batches.train", "batches.eval")),
    "grad_accum": Change(2, ("batches.train",)),
    "optimizer": Change("muon", ("optimizer.updates",)),
    "learning_rate": Change(2e-2, ("optimizer.updates", "lr")),
    "min_lr": Change(0.0, ("optimizer.updates", "lr")),
    "warmup_steps": Change(1, ("optimizer.updates", "lr")),
    "max_steps": Change(3, ("optimizer.updates", "lr", "run.log", "run.checkpoints")),
    "lr_decay_steps": Change(3, ("optimizer.updates", "lr")),
    "weight_decay": Change(0.5, ("optimizer.updates",)),
    "independent_weight_decay": Change(True, ("optimizer.updates",)),
    "beta1": Change(0.5, ("optimizer.updates",)),
    "beta2": Change(0.5, ("optimizer.updates",)),
    "grad_clip": Change(0.25, ("optimizer.updates",)),
    "muon_learning_rate": Change(0.05, ("optimizer.updates",), MUON),
    "muon_momentum": Change(0.5, ("optimizer.updates",), MUON),
    "muon_ns_steps": Change(3, ("optimizer.updates",), MUON),
    "muon_preconditioning": Change("aol", ("optimizer.updates",), MUON),
    "normuon": Change(True, ("optimizer.updates",), MUON),
    "normuon_beta2": Change(0.5, ("optimizer.updates",), {**MUON, "normuon": True}),
    "loss_scale_init": Change(2.0**10, ("optimizer.loss_scale",), FLOAT16),
    "loss_scale_growth_interval": Change(3, ("optimizer.loss_scale",), FLOAT16),
    "fsdp_min_size": Change(0, ("placements",)),
    "eval_interval": Change(2, ("run.log", "run.checkpoints")),
    "eval_iters": Change(3, ("run.log",)),
    "log_interval": Change(3, ("run.log",)),
    "keep_checkpoints": Change(1, ("run.checkpoints",)),
    "seed": Change(7, ("batches.train", "batches.eval", "state.params", "state.dropout_key")),
    "init_from": Change("gpt2", ("state.params",), {"model": "gpt2"}),  # a checkpoint's shapes
    "profile_steps": Change(1, ("debug_run.log",)),
    "target_val_loss": Change(100.0, ("run.log", "run.checkpoints")),
    # the gradients follow other targets too: the steps after the first log another loss
    "multi_token": Change(2, ("run.log",)),
    "multi_token_until": Change(0.25, ("ahead_weights",), {"multi_token": 2}),
    "model.block_size": Change(12, ("batches.train", "batches.eval")),
    "model.vocab_size": Change(96, ("shapes",)),
    "model.n_layer": Change(2, ("shapes",)),
    "model.n_head": Change(4, ("logits",)),
    "model.n_embd": Change(32, ("shapes",)),
    "model.dropout": Change(0.5, ("training_logits",)),
    "model.attn_dropout": Change(0.5, ("training_logits",)),
    "model.qk_norm": Change(False, ("shapes", "logits")),
    "model.tie_embeddings": Change(False, ("shapes", "logits")),
    "model.rope_base": Change(10.0, ("logits",)),
    # the same function computed another way: observed in the program traced
    "model.attention": Change("xla", ("program",)),
    "model.remat": Change(True, ("program",)),
    "model.unroll_layers": Change(False, ("program",), {"model": TWO_LAYERS}),  # 1 is no loop
    "model.compute_dtype": Change("bfloat16", ("logits",)),
    "model.position_embedding": Change("learned", ("shapes", "logits")),
    "model.norm": Change("layer", ("logits",)),
    "model.bias": Change(True, ("shapes", "logits")),
    "model.norm_eps": Change(0.5, ("logits",)),
    "model.mlp_activation": Change("relu2", ("logits",)),
    "model.value_embeds": Change(True, ("shapes", "logits")),
    "model.bigram_embed": Change(True, ("shapes", "logits")),
}

# Settings no fast test here can observe: why, and the test that observes each.
OBSERVED_ELSEWHERE = {
    "data_parallel": ("needs several devices, which jax fakes on a CPU only when XLA_FLAGS is set "
                      "before it starts: a subprocess, trained on 1x1 and 2x4 meshes",
                      "tests/test_train.py::test_fsdp_and_data_parallel_runs_match_one_device"),
    "fsdp": ("needs several devices (as data_parallel): the same subprocess checks each shard's "
             "size and the devices that hold it",
             "tests/test_train.py::test_fsdp_and_data_parallel_runs_match_one_device"),
    "hellaswag": ("scored on GPT-2 BPE data by a model with GPT-2's 50,257-token vocabulary: a "
                  "training run of its own, which reads the scores back from TensorBoard",
                  "tests/test_eval.py::test_hellaswag_in_training_is_scored_at_each_eval"),
    "deterministic": ("its effect, bit-for-bit reruns, exists only on a GPU (XLA:CPU is "
                      "deterministic anyway); what it does on any machine, setting XLA's flag "
                      "before the backend starts, is seen in a fresh process",
                      "tests/test_train.py::test_deterministic_switch_sets_xla_flag_before_the_"
                      "backend_starts"),
}


def test_every_setting_is_covered():
    names = setting_names(TrainConfig())
    missing = [n for n in names if n not in CHANGES and n not in OBSERVED_ELSEWHERE]
    assert not missing, (f"settings no test observes: {missing}; give each a CHANGES entry (what "
                         "it changes) or an OBSERVED_ELSEWHERE one (the test that observes it)")
    both = sorted(set(CHANGES) & set(OBSERVED_ELSEWHERE))
    assert not both, f"in CHANGES and OBSERVED_ELSEWHERE: {both}"
    stale = sorted((set(CHANGES) | set(OBSERVED_ELSEWHERE)) - set(names))
    assert not stale, f"entries for settings that no longer exist: {stale}"


@pytest.mark.parametrize("name", sorted(OBSERVED_ELSEWHERE))
def test_each_setting_observed_elsewhere_names_a_test_that_exists(name):
    reason, test_id = OBSERVED_ELSEWHERE[name]
    path, function = test_id.split("::")
    tree = ast.parse((TESTS.parent / path).read_text())
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert function in defined, f"{name}: {test_id} does not exist"
    source = (TESTS.parent / path).read_text()
    assert name in source, f"{name}: {path} never mentions it"
    assert reason


# ---------------------------------------------------------------------------------------------
# What a setting can change, each observed from a config (cached: a base is computed once)


@pytest.fixture(scope="module")
def where(tmp_path_factory, shakespeare_input) -> dict:
    """The two small corpora and a scratch directory for the runs."""
    folder = tmp_path_factory.mktemp("settings")
    text = shakespeare_input.read_text()
    for name, part in (("data", text[:6000]), ("other", text[6000:12000])):
        (folder / f"{name}.txt").write_text(part)
        prepare_shakespeare.main(["--input", str(folder / f"{name}.txt"), "--out_dir",
                                  str(folder / name)])
    # a GPT-2-layout checkpoint of the tiny model's sizes, for init_from
    gpt2.save(random_model(dataclasses.replace(TINY, **GPT2_ARCHITECTURE)), folder / "gpt2", 53)
    return {"folder": folder, "data": str(folder / "data"), "other": str(folder / "other"),
            "gpt2": str(folder / "gpt2")}


def base_config(where: dict) -> TrainConfig:
    return TrainConfig(data_dir=where["data"], **BASE_CHANGES)


def resolve(value, where: dict):
    """A CHANGES value or context value that names a fixture's path, or a model, made real."""
    return where.get(value, value) if isinstance(value, str) else value


def params_of(model) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


# Global gradient norms of the six steps the optimizer is fed: above and below grad_clip (1.0)
# and 0.25, so that a clip (or none) changes how the steps mix in the moments.
GRAD_NORMS = (4.0, 0.1, 2.0, 0.3, 1.5, 0.05)


def fixed_grads(params) -> list:
    rng = np.random.default_rng(0)
    grads = []
    for norm in GRAD_NORMS:
        leaves = [rng.standard_normal(p.shape).astype(np.float32) for p in jax.tree.leaves(params)]
        scale = norm / np.sqrt(sum(np.sum(g**2) for g in leaves))
        grads.append(jax.tree.unflatten(jax.tree.structure(params), [g * scale for g in leaves]))
    return grads


# Parameters as the GPT names them, one of each kind the optimizer tells apart: a matrix outside
# the blocks (AdamW, decayed), a stacked block matrix (AdamW or Muon; q, k, v apart), a gain.
OPTIMIZER_PARAMS = {
    "embed": np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32),
    "blocks": {"attn": {"qkv": {"weight": np.random.default_rng(3).standard_normal((1, 8, 24))
                                .astype(np.float32)}},
               "attn_norm": {"weight": np.ones((1, 8), np.float32)}},
}


def observe_optimizer(config: TrainConfig, where):
    """make_optimizer's updates over six steps of fixed gradients (the params moved by each),
    and the loss scale after each (None but under float16 compute)."""
    params = jax.tree.map(jnp.asarray, OPTIMIZER_PARAMS)
    optimizer = optim.make_optimizer(config)
    update, state = jax.jit(optimizer.update), optimizer.init(params)
    updates_seen, scales = [], []
    for grads in fixed_grads(params):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        updates_seen.append([np.asarray(u) for u in jax.tree.leaves(updates)])
        scales.append(optim.loss_scale(state))
    return {"updates": updates_seen, "loss_scale": scales}


def observe_lr(config: TrainConfig, where):
    return np.asarray(optim.lr_schedule(config)(jnp.arange(8)))


def observe_ahead_weights(config: TrainConfig, where):
    """The weights of the targets ahead (multi-token prediction) over the first 8 steps."""
    return np.asarray(jax.vmap(train.multi_token_schedule(config))(jnp.arange(8)))


def observe_shapes(config: TrainConfig, where):
    abstract = eqx.filter_eval_shape(GPT, config.model, key=jr.key(0))
    return [(jax.tree_util.keystr(path), a.shape) for path, a in
            jax.tree_util.tree_leaves_with_path(abstract)]


TOKENS = np.random.default_rng(0).integers(0, 53, (2, 9), dtype=np.int32)  # the corpus has 53


def random_model(config: GPTConfig) -> GPT:
    """A GPT of config's shapes, every parameter random (no compile): a gain of 1 or a table of
    zeros at init would hide whether it is read."""
    rng = np.random.default_rng(1)
    abstract = eqx.filter_eval_shape(GPT, config, key=jr.key(0))
    return jax.tree.map(lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32), abstract)


@eqx.filter_jit
def logits_of(model, tokens):
    return model.logits(forward(model, tokens)[0]).astype(jnp.float32)


def observe_logits(config: TrainConfig, where):
    return np.asarray(logits_of(random_model(config.model), TOKENS[:, :-1]))


def observe_training_logits(config: TrainConfig, where):
    """One sequence's logits with a key, as training computes them: dropout is on. (An rbg key:
    threefry's bits took ~3x longer to compile on a CPU.)"""
    model, key = random_model(config.model), jr.key(3, impl="rbg")
    return np.asarray(eqx.filter_jit(lambda m, t, k: m(t, key=k))(model, TOKENS[0, :-1], key))


def observe_program(config: TrainConfig, where):
    """The traced loss and gradient: how the same function is computed."""
    model = random_model(config.model)
    loss_and_grads = eqx.filter_value_and_grad(loss_fn)
    return str(eqx.filter_make_jaxpr(loss_and_grads)(model, TOKENS[:, :-1], TOKENS[:, 1:])[0])


def observe_batches(config: TrainConfig, where):
    """The first two training batches and the first batch of each evaluation split."""
    mesh = sharding.make_mesh(config)
    batches, evals, _ = train.open_data(config, data.load_meta(config.data_dir), mesh)
    return {"train": [batches.batch(0), batches.batch(1)],
            "eval": [sampler.batch(0) for sampler in evals.values()]}


def observe_state(config: TrainConfig, where):
    """The state a new run starts from: its parameters and its dropout key."""
    mesh = sharding.make_mesh(config)
    abstract = train.abstract_state(config, mesh)
    params, _, key_data, _, _ = train.create_or_restore_state(config, abstract, None, None, None)
    return {"params": params_of(params), "dropout_key": np.asarray(key_data)}


def observe_placements(config: TrainConfig, where):
    """How every parameter and optimizer state would be split over 4 FSDP shards."""
    params, opt_state, _, _ = train.abstract_state(config, AbstractMesh((1, 4), ("data", "fsdp")))
    return [str(leaf.sharding.spec) for leaf in jax.tree.leaves((params, opt_state))]


RUNS = itertools.count()


def log_record(rundir: Path) -> list[str]:
    """log.txt's step, evaluation and profile lines, without the times (they vary)."""
    kept = []
    for line in (rundir / "log.txt").read_text().splitlines():
        if match := re.match(r"(step \d+ \| loss \S+ \| lr \S+ \| grad norm \S+) \|", line):
            kept.append(match[1])
        elif re.match(r"step \d+ \| (eval|reached)|profile of", line):
            kept.append(line.split(" after ")[0].replace(str(rundir), "RUNDIR"))
    return kept


def observe_run(config: TrainConfig, where):
    rundir = where["folder"] / f"run{next(RUNS)}"
    train.train(config, rundir)
    kept = checkpoints.checkpoint_manager(rundir).all_steps()
    return {"log": log_record(rundir), "checkpoints": sorted(kept)}


def observe_debug_run(config: TrainConfig, where):
    rundir = where["folder"] / f"run{next(RUNS)}"
    train.train(config, rundir, debug=True)
    return {"log": log_record(rundir)}


OBSERVERS: dict[str, Callable] = {
    "optimizer": observe_optimizer, "lr": observe_lr, "ahead_weights": observe_ahead_weights,
    "shapes": observe_shapes,
    "logits": observe_logits, "training_logits": observe_training_logits,
    "program": observe_program,
    "batches": observe_batches, "state": observe_state, "placements": observe_placements,
    "run": observe_run, "debug_run": observe_debug_run,
}
OBSERVED: dict = {}  # (observer, config) -> what it saw


def observe(what: str, config: TrainConfig, where) -> object:
    """One observation, "observer" or "observer.part" (a part of what it returns)."""
    observer, _, part = what.partition(".")
    if (observer, config) not in OBSERVED:
        OBSERVED[observer, config] = OBSERVERS[observer](config, where)
    seen = OBSERVED[observer, config]
    return seen[part] if part else seen


def differs(a, b) -> bool:
    """Not the same structure, shapes or dtypes, or values apart by more than float rounding."""
    if isinstance(a, str) or isinstance(b, str):
        return a != b
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    if tree_a != tree_b:
        return True
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return True
        if x.dtype.kind == "f" and not np.allclose(x, y, rtol=1e-5, atol=1e-7):
            return True
        if x.dtype.kind != "f" and not np.array_equal(x, y):
            return True
    return False


def context_of(change: Change, where: dict) -> dict:
    context = {name: resolve(value, where) for name, value in change.context.items()}
    if context.get("model") == where["gpt2"]:  # the checkpoint's shapes, as launch.py gives them
        checkpoint, _ = gpt2.read_config(Path(where["gpt2"]))
        context["model"] = gpt2.with_shapes_of(TINY, checkpoint)
    return context


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_changing_a_setting_changes_what_it_names(name, where):
    change = CHANGES[name]
    base = dataclasses.replace(base_config(where), **context_of(change, where))
    value = resolve(change.value, where)
    assert value != get_setting(base, name), f"{name}: the change must differ from the base"
    changed = with_setting(base, name, value)
    unchanged = [what for what in change.changes
                 if not differs(observe(what, base, where), observe(what, changed, where))]
    assert not unchanged, (f"{name}={value!r} (base {get_setting(base, name)!r}) left {unchanged} "
                           "as they were")


# ---------------------------------------------------------------------------------------------
# Settings read in several places: each place is checked, not only the first one seen


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_norm_eps_is_every_norms_epsilon(norm):
    # model.norm_eps changes the output through the QK-norm alone: a norm that fell back to its
    # own default epsilon would still pass test_changing_a_setting_changes_what_it_names.
    config = dataclasses.replace(TINY, norm=norm, norm_eps=0.25)
    abstract = eqx.filter_eval_shape(GPT, config, key=jr.key(0))
    norms = [m for m in jax.tree.leaves(abstract, is_leaf=lambda m: isinstance(m, NORMS))
             if isinstance(m, NORMS)]
    assert len(norms) == 5  # the two before each block's parts, q's and k's, the final one
    assert [m.eps for m in norms] == [0.25] * len(norms)
