"""The optimizer (AdamW or Muon through one set of labels), the relu2 MLP, and
--target_val_loss. Fake devices need XLA_FLAGS set before jax is imported: that check runs in a
subprocess."""

import dataclasses
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
import dataclasses, numpy as np, jax, equinox as eqx
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
    abstract_params, abstract_opt, static, optimizer = train.abstract_state(config, mesh)
    params, opt_state = train.init_state(config, abstract_params, abstract_opt, optimizer)
    model = eqx.combine(params, static)
    step = train.make_train_step(config, optimizer, abstract_params, abstract_opt)
    rows = sharding.batch_sharding(mesh)
    for i in range(3):
        x, y = (jax.device_put(a, rows) for a in (tokens[i, :, :, :-1], tokens[i, :, :, 1:]))
        model, opt_state, _ = step(model, opt_state, x, y, np.int32(i), np.zeros(2, np.uint32))
    return model, opt_state
one, _ = train_3_steps(dataclasses.replace(config, fsdp=1))
eight, opt_state = train_3_steps(config)
mu = opt_state[1].inner_states["muon"].inner_state[0][0].mu.blocks.mlp.fc.weight
assert len(mu.sharding.device_set) == 8 and not mu.sharding.is_fully_replicated, mu.sharding
qkv = eight.blocks.attn.qkv.weight
assert len(qkv.sharding.device_set) == 8 and not qkv.sharding.is_fully_replicated, qkv.sharding
worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
            zip(jax.tree.leaves(eqx.filter(one, eqx.is_array)), jax.tree.leaves(eqx.filter(eight, eqx.is_array))))
print("MAX DIFF", worst)
"""


@pytest.mark.slow
def test_muon_over_8_fsdp_shards_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
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
