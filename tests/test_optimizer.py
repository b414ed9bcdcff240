"""The optimizer (AdamW or Muon through one set of labels), the relu2 MLP, and
--target_val_loss. Fake devices need XLA_FLAGS set before jax is imported: that check runs in a
subprocess."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import checkpoints
import cli
import optim
import train
from config import TrainConfig
from conftest import fake_devices
from model import GPT, GPT2_ARCHITECTURE, GPTConfig

REPO = Path(__file__).resolve().parents[1]
TINY = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, compute_dtype="float32")
# A few steps of a tiny model: what the in-process runs below train.
TINY_RUN = ["--model.n_layer=2", "--model.n_embd=64", "--model.n_head=4", "--model.block_size=32",
            "--batch_size=8", "--eval_iters=2", "--log_interval=1", "--warmup_steps=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shakespeare_input) -> str:
    out = tmp_path_factory.mktemp("data") / "shakespeare_char"
    subprocess.run([sys.executable, str(REPO / "prepare_shakespeare.py"), "--input",
                    str(shakespeare_input), "--out_dir", str(out)], check=True, capture_output=True)
    return str(out)


def run_config(data_dir, *overrides) -> TrainConfig:
    return cli.apply_overrides(cli.load_config("shakespeare_char_cpu", TrainConfig),
                                  [f"--data_dir={data_dir}", *TINY_RUN, *overrides])


def labels_by_path(config: TrainConfig) -> dict[str, str]:
    params = eqx.filter(GPT(config.model, key=jr.key(0)), eqx.is_array)
    labels = optim.optimizer_labels(config)(params)
    return {jax.tree_util.keystr(p): label for p, label in jax.tree_util.tree_leaves_with_path(labels)}


BLOCK_MATRICES = {".blocks.attn.qkv.weight", ".blocks.attn.proj.weight", ".blocks.mlp.fc.weight",
                  ".blocks.mlp.proj.weight"}


@pytest.mark.parametrize("architecture", ["rope", "gpt2"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_labels_give_muon_the_block_matrices_and_adamw_the_rest(architecture, tied, optimizer):
    switches = GPT2_ARCHITECTURE if architecture == "gpt2" else {}
    model = dataclasses.replace(TINY, **{**switches, "tie_embeddings": tied})
    labels = labels_by_path(TrainConfig(model=model, optimizer=optimizer))
    by_label = {name: {p for p, label in labels.items() if label == name}
                for name in ("muon", "decay", "no_decay")}
    assert set(labels.values()) <= set(by_label)
    other_matrices = {".embed"} | (set() if tied else {".lm_head"})
    other_matrices |= {".pos_embed"} if architecture == "gpt2" else set()
    if optimizer == "muon":
        assert by_label["muon"] == BLOCK_MATRICES
        assert by_label["decay"] == other_matrices
    else:
        assert by_label["muon"] == set()
        assert by_label["decay"] == BLOCK_MATRICES | other_matrices
    # everything else is a norm gain or a bias: one dimension per layer
    params = eqx.filter(GPT(model, key=jr.key(0)), eqx.is_array)
    shapes = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(params)}
    for path in by_label["no_decay"]:
        assert len(shapes[path]) == 1 + path.startswith(".blocks"), path
    if architecture == "gpt2":
        assert ".blocks.attn.qkv.bias" in by_label["no_decay"]


def test_normuon_evens_out_each_neurons_update_and_keeps_the_matrix_norm():
    # One statistic per neuron of the longer side (the output side of a square matrix), decayed
    # by beta2; each matrix keeps its Frobenius norm. Checked over two steps against the definition.
    beta2 = 0.9
    normuon = optim.normuon(beta2)
    shapes = {"square": (2, 16, 16), "tall": (2, 48, 16), "wide": (2, 16, 48)}
    updates = [{name: jr.normal(jr.key(step), shape) * jnp.linspace(0.1, 3.0, shape[-1])
                * jnp.linspace(0.1, 3.0, shape[-2])[:, None] for name, shape in shapes.items()}
               for step in range(2)]
    state, update = normuon.init(updates[0]), jax.jit(normuon.update)
    nu = {name: 0.0 for name in shapes}
    for step in range(2):
        out, state = update(updates[step], state)
        for name, axis in (("square", -2), ("tall", -1), ("wide", -2)):
            u = np.asarray(updates[step][name], np.float64)
            nu[name] = beta2 * nu[name] + (1 - beta2) * np.mean(u**2, axis=axis, keepdims=True)
            expected = u / np.sqrt(nu[name])
            expected *= (np.linalg.norm(u, axis=(-2, -1), keepdims=True)
                         / np.linalg.norm(expected, axis=(-2, -1), keepdims=True))
            np.testing.assert_allclose(out[name], expected, rtol=1e-4)
            np.testing.assert_allclose(np.linalg.norm(out[name], axis=(-2, -1)),
                                       np.linalg.norm(u, axis=(-2, -1)), rtol=1e-5)
    # on the first step every neuron comes out with the same norm
    first, _ = update(updates[0], normuon.init(updates[0]))
    for name, axis in (("square", -2), ("tall", -1), ("wide", -2)):
        neuron_norms = np.linalg.norm(np.asarray(first[name]), axis=axis)
        np.testing.assert_allclose(neuron_norms, np.broadcast_to(neuron_norms[..., :1], neuron_norms.shape),
                                   rtol=1e-4)


def test_aol_orthogonalises_in_4_steps_as_well_as_5_without_it():
    # A square Gaussian has singular values near 0: 4 plain steps leave the smallest far below
    # 5 steps' ~0.5; AOL's rescaled first step gets there in 4 (optax: "one step less").
    grad = {"blocks": {"w": jr.normal(jr.key(3), (1, 128, 128))}}
    params = jax.tree.map(jnp.zeros_like, grad)
    smallest = {}
    for preconditioning, steps in (("frobenius", 5), ("aol", 4), ("frobenius", 4)):
        muon = optim.muon(TrainConfig(optimizer="muon", muon_preconditioning=preconditioning,
                                      muon_ns_steps=steps))
        update, _ = muon.update(grad, muon.init(params), params)
        singular_values = np.linalg.svd(np.asarray(update["blocks"]["w"][0]), compute_uv=False)
        assert singular_values.max() < 1.25, (preconditioning, steps, singular_values.max())
        smallest[preconditioning, steps] = singular_values.min()
    assert smallest["aol", 4] > 0.9 * smallest["frobenius", 5], smallest
    assert smallest["frobenius", 4] < 0.5 * smallest["frobenius", 5], smallest


def test_muon_orthogonalises_each_layer_on_its_own():
    # Two layers' gradients 10^4 apart in scale: orthogonalised per layer, both come out with
    # singular values near 1; orthogonalised as one stack, the small one would vanish. Tall
    # (96, 48): a random square matrix has singular values near 0 that 5 iterations cannot lift.
    layers, d = 2, 48
    grad = jr.normal(jr.key(0), (layers, 2 * d, d)) * jnp.array([100.0, 0.01])[:, None, None]
    params = {"blocks": {"w": jnp.zeros_like(grad)}}
    muon = optim.muon(TrainConfig(optimizer="muon"))
    updates, _ = muon.update({"blocks": {"w": grad}}, muon.init(params), params)
    for layer in range(layers):
        singular_values = np.linalg.svd(np.asarray(updates["blocks"]["w"][layer]), compute_uv=False)
        # Newton-Schulz with the speedrun's coefficients lands in about [0.7, 1.2], not exactly 1
        assert 0.5 < singular_values.min() and singular_values.max() < 1.5, (layer, singular_values)


def test_muon_scales_wide_matrices_by_the_root_of_their_aspect_ratio():
    d = 32
    muon = optim.muon(TrainConfig(optimizer="muon"))
    grads = {"wide": jr.normal(jr.key(0), (1, d, 4 * d)), "tall": jr.normal(jr.key(1), (1, 4 * d, d))}
    params = jax.tree.map(jnp.zeros_like, grads)
    updates, _ = muon.update(grads, muon.init(params), params)
    top = {name: np.linalg.svd(np.asarray(u[0]), compute_uv=False).max() for name, u in updates.items()}
    assert 1.5 < top["wide"] / top["tall"] < 2.5  # sqrt(4) = 2 for (d, 4d); 1 for (4d, d)


@pytest.mark.parametrize("independent", [False, True])
def test_each_label_decays_by_its_own_peak_learning_rate(independent):
    # Zero gradients: what remains of each update is the decoupled weight decay, -lr * wd * param;
    # independent decay is wd * lr(t) / peak: at step 0 (the peak, no warmup) -wd * param.
    config = TrainConfig(model=dataclasses.replace(TINY, tie_embeddings=False),
                         optimizer="muon", learning_rate=1e-3, muon_learning_rate=0.05,
                         weight_decay=0.1, warmup_steps=0, max_steps=10,
                         independent_weight_decay=independent)
    params = eqx.filter(GPT(config.model, key=jr.key(0)), eqx.is_array)
    optimizer = optim.make_optimizer(config)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    labels = optim.optimizer_labels(config)(params)
    assert set(jax.tree.leaves(labels)) == {"muon", "decay", "no_decay"}
    lr = {"muon": 0.05, "decay": 1e-3, "no_decay": 0.0}
    if independent:
        lr = {"muon": 1.0, "decay": 1.0, "no_decay": 0.0}
    for label, update, param in zip(jax.tree.leaves(labels), jax.tree.leaves(updates),
                                    jax.tree.leaves(params)):
        np.testing.assert_allclose(update, -lr[label] * 0.1 * param, rtol=1e-5, atol=1e-12)


def test_muon_takes_the_loss_down_on_a_fixed_batch():
    config = TrainConfig(model=TINY, optimizer="muon", warmup_steps=0, max_steps=1000,
                               learning_rate=3e-3, muon_learning_rate=0.05)
    model = GPT(config.model, key=jr.key(0))
    optimizer = optim.make_optimizer(config)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    tokens = jr.randint(jr.key(1), (4, 17), 0, 65)

    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(train.loss_fn)(model, tokens[:, :-1], tokens[:, 1:])
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    losses = []
    for _ in range(30):
        model, opt_state, loss = step(model, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


SHARDED_MUON = """
import dataclasses, numpy as np, jax
import sys; sys.path.insert(0, {repo!r})
import sharding, train
from config import TrainConfig
from model import GPTConfig
assert len(jax.devices()) == 8
config = TrainConfig(model=GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4,
                           n_embd=64, compute_dtype="float32"), batch_size=8, optimizer="muon",
                           warmup_steps=0, max_steps=10, fsdp_min_size=0)
rng = np.random.default_rng(0)
tokens = rng.integers(0, 64, (3, 1, 8, 17), dtype=np.int32)
def train_3_steps(config):
    mesh = sharding.make_mesh(config)
    params, opt_state, step = train.new_state_and_step(config, mesh)
    rows = sharding.batch_sharding(mesh)
    for i in range(3):
        x, y = (jax.device_put(a, rows) for a in (tokens[i, :, :, :-1], tokens[i, :, :, 1:]))
        params, opt_state, _ = step(params, opt_state, x, y, np.int32(i), np.zeros(2, np.uint32))
    return params, opt_state
one, _ = train_3_steps(dataclasses.replace(config, fsdp=1))
eight, opt_state = train_3_steps(config)
mu = opt_state[1].inner_states["muon"].inner_state[0][0].mu.blocks.mlp.fc.weight
assert len(mu.sharding.device_set) == 8 and not mu.sharding.is_fully_replicated, mu.sharding
qkv = eight.blocks.attn.qkv.weight
assert len(qkv.sharding.device_set) == 8 and not qkv.sharding.is_fully_replicated, qkv.sharding
worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
            zip(jax.tree.leaves(one), jax.tree.leaves(eight)))
print("MAX DIFF", worst)
"""


@pytest.mark.slow
def test_muon_over_8_fsdp_shards_equals_one_device():
    env = {**os.environ, **fake_devices(8)}
    result = subprocess.run([sys.executable, "-c", SHARDED_MUON.format(repo=str(REPO))], env=env,
                            capture_output=True, text=True, timeout=600)
    assert "MAX DIFF" in result.stdout, result.stdout + result.stderr
    worst = float(result.stdout.split("MAX DIFF")[1])
    # float32 throughout; sharded matmuls sum in another order: a few ulps over three steps
    assert worst < 1e-5, worst


def params_of(model) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


# Every optimizer state a switch adds: NorMuon's second moment (and AOL, which changes the step).
NEW_STATES = ["--normuon=True", "--muon_preconditioning=aol", "--muon_ns_steps=4"]


@pytest.mark.slow
@pytest.mark.parametrize("switches", [[], NEW_STATES], ids=["muon", "new_states"])
def test_a_resumed_muon_run_equals_an_uninterrupted_one_bit_for_bit(data_dir, tmp_path, switches):
    config = run_config(data_dir, "--optimizer=muon", "--max_steps=8", "--lr_decay_steps=8",
                        "--eval_interval=4", *switches)
    straight = train.train(config, tmp_path / "straight")
    train.train(dataclasses.replace(config, max_steps=4), tmp_path / "resumed")
    resumed = train.train(config, tmp_path / "resumed")
    assert "resuming at step 4" in (tmp_path / "resumed" / "log.txt").read_text()
    for a, b in zip(params_of(straight), params_of(resumed)):
        np.testing.assert_array_equal(a, b)  # Muon's momentum came back from the checkpoint


def test_target_val_loss_stops_at_the_first_evaluation_that_reaches_it(data_dir, tmp_path):
    config = run_config(data_dir, "--max_steps=12", "--eval_interval=3")
    train.train(dataclasses.replace(config, target_val_loss=100.0), tmp_path / "reached")
    log = (tmp_path / "reached" / "log.txt").read_text()
    assert "step 3 | reached val" in log and "<= target_val_loss=100.0 after" in log, log
    assert "compilation and 1 evaluation's" in log, log  # its one evaluation, at step 3
    assert "step 4 |" not in log and "step 6 | eval" not in log, log
    manager = checkpoints.checkpoint_manager(tmp_path / "reached")
    assert manager.all_steps() == [3]  # the step that reached it is saved

    train.train(dataclasses.replace(config, target_val_loss=0.001), tmp_path / "missed")
    log = (tmp_path / "missed" / "log.txt").read_text()
    assert "reached val" not in log and "step 12 | eval" in log, log


def test_relu_squared_mlp_computes_relu_x_squared():
    config = dataclasses.replace(TINY, mlp_activation="relu2")
    mlp = GPT(config, key=jr.key(0)).blocks
    mlp = jax.tree.map(lambda a: a[0] if eqx.is_array(a) else a, mlp).mlp  # layer 0
    x = jr.normal(jr.key(1), (5, config.n_embd))
    hidden = x @ mlp.fc.weight
    expected = (np.maximum(np.asarray(hidden), 0) ** 2) @ np.asarray(mlp.proj.weight)
    np.testing.assert_allclose(mlp(x), expected, rtol=1e-5, atol=1e-6)


BAD = [("--muon_learning_rate=-0.02", "muon_learning_rate"), ("--muon_learning_rate=0", "muon_learning_rate"),
       ("--muon_momentum=1.0", "muon_momentum"), ("--optimizer=sgd", "optimizer"),
       ("--model.mlp_activation=swish", "mlp_activation"),
       ("--target_val_loss=-1", "target_val_loss"), ("--muon_ns_steps=0", "muon_ns_steps"),
       ("--muon_preconditioning=spectral", "muon_preconditioning"),
       ("--normuon_beta2=1", "normuon_beta2")]


@pytest.mark.parametrize("bad, field", BAD)
def test_bad_optimizer_and_switch_values_are_refused_naming_the_field(bad, field):
    with pytest.raises(train.UserError, match=f"{field}=") as refused:
        cli.apply_overrides(cli.load_config("shakespeare_char_cpu", TrainConfig), bad.split())
    assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_a_bad_muon_value_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "launch.py"), "--config=shakespeare_char_cpu",
                             "--muon_momentum=1.5", f"--rundir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and "muon_momentum" in result.stderr
    assert not (tmp_path / "run").exists()


def test_muon_orthogonalises_q_k_and_v_apart():
    # q's gradient 10^4 times k's and v's: orthogonalised as one fused matrix, k and v would
    # vanish beside q; apart, each of the three comes out with singular values near 1.
    d = 48
    parts = [jr.normal(jr.key(i), (1, 2 * d, d)) * scale for i, scale in enumerate([100.0, 0.01, 0.01])]
    grad = {"blocks": {"qkv": {"w": jnp.concatenate(parts, axis=-1)}}}
    params = jax.tree.map(jnp.zeros_like, grad)
    muon = optim.muon(TrainConfig(optimizer="muon"))
    updates, _ = muon.update(grad, muon.init(params), params)
    assert updates["blocks"]["qkv"]["w"].shape == (1, 2 * d, 3 * d)
    for part in jnp.split(updates["blocks"]["qkv"]["w"][0], 3, axis=-1):
        singular_values = np.linalg.svd(np.asarray(part), compute_uv=False)
        assert 0.5 < singular_values.min() and singular_values.max() < 1.5, singular_values


# ---------------------------------------------------------------------------------------------
# The optimizer's settings against their definitions: make_optimizer's updates over a few steps
# of known gradients, next to a few lines of numpy (float64) that write each definition out.


def schedule_reference(config: TrainConfig, step: int) -> float:
    """Linear warmup from 0, then a cosine from learning_rate down to min_lr, then min_lr."""
    peak, floor, warmup = config.learning_rate, config.min_lr, config.warmup_steps
    end = config.lr_decay_steps or config.max_steps
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / (end - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def clip_reference(config: TrainConfig, grads: list[np.ndarray]) -> list[np.ndarray]:
    """Scaled by grad_clip / global norm when the global norm is above grad_clip; 0: off."""
    norm = math.sqrt(sum(float(np.sum(g**2)) for g in grads))
    scale = config.grad_clip / norm if 0 < config.grad_clip < norm else 1.0
    return [g * scale for g in grads]


def known_gradients(params, norms: tuple[float, ...]) -> list:
    """One gradient tree per step, of global norm norms[step]."""
    rng = np.random.default_rng(0)
    steps = []
    for norm in norms:
        leaves = [rng.standard_normal(p.shape) for p in jax.tree.leaves(params)]
        scale = norm / math.sqrt(sum(np.sum(g**2) for g in leaves))
        steps.append(jax.tree.unflatten(jax.tree.structure(params),
                                        [(g * scale).astype(np.float32) for g in leaves]))
    return steps


def updates_of(config: TrainConfig, params, gradients) -> list[list[np.ndarray]]:
    """make_optimizer's update at each step, the parameters moved by each."""
    optimizer = optim.make_optimizer(config)
    update, state, out = jax.jit(optimizer.update), optimizer.init(params), []
    for grads in gradients:
        updates, state = update(grads, state, params)
        params = eqx.apply_updates(params, updates)
        out.append([np.asarray(u, np.float64) for u in jax.tree.leaves(updates)])
    return out


def adamw_reference(config: TrainConfig, params, gradients) -> list[list[np.ndarray]]:
    """Clip, then Adam with bias correction (eps 1e-8, optax's), plus decoupled weight decay on
    the matrices (2-d in the model, 3-d when stacked in .blocks), times the scheduled lr."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    p = [np.asarray(a, np.float64) for a in jax.tree.leaves(params)]
    decayed = [a.ndim - path.startswith(".blocks") >= 2 for path, a in zip(paths, p)]
    m, v, out = [0.0] * len(p), [0.0] * len(p), []
    for t, grads in enumerate(gradients, start=1):
        g = clip_reference(config, [np.asarray(a, np.float64) for a in jax.tree.leaves(grads)])
        lr, b1, b2 = schedule_reference(config, t - 1), config.beta1, config.beta2
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi**2 for vi, gi in zip(v, g)]
        step = [-lr * ((mi / (1 - b1**t)) / (np.sqrt(vi / (1 - b2**t)) + 1e-8)
                       + config.weight_decay * pi * d) for mi, vi, pi, d in zip(m, v, p, decayed)]
        p = [pi + si for pi, si in zip(p, step)]
        out.append(step)
    return out


# Global gradient norms, above and below grad_clip=1: every step's lr is seen (warmup 2, cosine
# to step 5, then min_lr).
NORMS = (3.0, 0.2, 0.6, 2.5, 0.05, 1.5)
DEFINED = TrainConfig(model=TINY, learning_rate=1e-2, min_lr=2e-3, warmup_steps=2, max_steps=5,
                      beta1=0.8, beta2=0.9, weight_decay=0.3, grad_clip=1.0)


@pytest.mark.parametrize("grad_clip", [1.0, 0.0, 100.0], ids=["clips", "off", "never_reached"])
def test_adamw_is_clipping_then_adam_then_decay_on_matrices_at_the_scheduled_lr(grad_clip):
    config = dataclasses.replace(DEFINED, grad_clip=grad_clip)
    params = eqx.filter(GPT(TINY, key=jr.key(0)), eqx.is_array)
    gradients = known_gradients(params, NORMS)
    expected = adamw_reference(config, params, gradients)
    for step, (got, want) in enumerate(zip(updates_of(config, params, gradients), expected)):
        for a, b in zip(got, want):  # float32 against float64: a few ulps of the update
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-9, err_msg=f"step {step}")
    # The clip matters at these gradients: without it (or with it) the steps would differ.
    other_clip = 0.0 if grad_clip == 1.0 else 1.0
    other = adamw_reference(dataclasses.replace(config, grad_clip=other_clip), params, gradients)
    assert not np.allclose(np.concatenate([u.ravel() for u in other[3]]),
                           np.concatenate([u.ravel() for u in expected[3]]), rtol=1e-3)


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic (Jordan et al. 2024; optax's default)


def orthogonalised(x: np.ndarray, steps: int) -> np.ndarray:
    """Newton-Schulz on one matrix, Frobenius-normalised first, iterated on its wide form."""
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(steps):
        a = x @ x.T
        x = NS_COEFFICIENTS[0] * x + (NS_COEFFICIENTS[1] * a + NS_COEFFICIENTS[2] * a @ a) @ x
    return x.T if tall else x


def muon_reference(config: TrainConfig, params, gradients, path: str) -> list[np.ndarray]:
    """One Muon leaf's updates: clip (over all gradients), Nesterov momentum as optax writes it (an
    average with bias correction), each layer's matrix (q, k and v apart) orthogonalised, NorMuon
    with its beta2, scaled by sqrt(max(1, d_out/d_in)), decay added, at muon_learning_rate's
    schedule (lr(t) * muon_learning_rate / learning_rate)."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    index = paths.index(path)
    p = np.asarray(jax.tree.leaves(params)[index], np.float64)
    parts = 3 if "qkv" in path else 1
    beta, m, nu, out = config.muon_momentum, 0.0, {}, []
    for t, grads in enumerate(gradients, start=1):
        g = clip_reference(config, [np.asarray(a, np.float64) for a in jax.tree.leaves(grads)])
        g = g[index]
        m = beta * m + (1 - beta) * g
        nesterov = beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta**t)
        update = np.empty_like(p)
        for layer, part in np.ndindex(p.shape[0], parts):
            columns = slice(part * p.shape[2] // parts, (part + 1) * p.shape[2] // parts)
            u = orthogonalised(nesterov[layer][:, columns], config.muon_ns_steps)
            if config.normuon:
                axis = -1 if u.shape[0] > u.shape[1] else -2
                b2 = config.normuon_beta2
                nu[layer, part] = (b2 * nu.get((layer, part), 0.0)
                                   + (1 - b2) * np.mean(u**2, axis=axis, keepdims=True))
                normed = u / np.sqrt(nu[layer, part])
                u = normed * np.linalg.norm(u) / np.linalg.norm(normed)
            update[layer][:, columns] = u * math.sqrt(max(1.0, u.shape[1] / u.shape[0]))
        lr = schedule_reference(config, t - 1) * config.muon_learning_rate / config.learning_rate
        step = -lr * (update + config.weight_decay * p)
        p = p + step
        out.append(step)
    return out


@pytest.mark.parametrize("switches", [dict(), dict(muon_momentum=0.5, muon_ns_steps=3),
                                      dict(normuon=True, normuon_beta2=0.5)],
                         ids=["defaults", "momentum_and_ns_steps", "normuon"])
def test_muon_is_nesterov_momentum_orthogonalised_per_matrix_at_its_own_lr(switches):
    config = dataclasses.replace(DEFINED, optimizer="muon", muon_learning_rate=0.05, **switches)
    params = eqx.filter(GPT(TINY, key=jr.key(0)), eqx.is_array)
    gradients = known_gradients(params, NORMS[:4])
    got = updates_of(config, params, gradients)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for path in (".blocks.mlp.fc.weight", ".blocks.attn.qkv.weight"):
        expected = muon_reference(config, params, gradients, path)
        for step in range(len(gradients)):
            # Newton-Schulz's five products in float32 against float64: ~1e-5 of the update
            scale = np.abs(expected[step]).max()
            np.testing.assert_allclose(got[step][paths.index(path)], expected[step],
                                       atol=2e-4 * scale, rtol=0, err_msg=f"{path} step {step}")
