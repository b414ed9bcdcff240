"""Training: the config, the mesh and FSDP shardings, the optimizer, the step, and the loop.

Read top to bottom: TrainConfig -> mesh + sharding rule -> optimizer -> train/eval step -> the
run directory's config -> throughput -> `train(config, rundir)`, the loop. checkpoints.py saves
and restores; `launch.py` is the command line on top of `train`.
"""

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import checkpoints
import data
import evaluation
import gpt2
from cli import UserError, bar_width
from model import GPT, GPTConfig, flops_per_token, loss_fn, num_params


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data_dir: str = "data/openwebtext"  # a directory made by a prepare_*.py script
    model: GPTConfig = GPTConfig()
    # batch: each step sees grad_accum * batch_size * block_size tokens
    batch_size: int = 12  # sequences per micro-batch, over all devices and hosts
    grad_accum: int = 1  # micro-batches per step, summed with lax.scan
    # optimizer: AdamW (or Muon for the block matrices), warmup then cosine decay to min_lr
    optimizer: str = "adamw"  # "adamw", or "muon": Muon on the blocks' matrices, AdamW elsewhere
    learning_rate: float = 6e-4  # peak learning rate (of AdamW)
    min_lr: float = 6e-5  # learning rate at the end of the cosine
    warmup_steps: int = 2000  # linear warmup from 0
    max_steps: int = 600000  # steps to train for
    lr_decay_steps: int = 0  # length of warmup + cosine; 0 means max_steps
    weight_decay: float = 0.1  # applied to matrices only
    independent_weight_decay: bool = False  # scale decay by lr/learning_rate (Wortsman 2023)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    muon_learning_rate: float = 0.02  # Muon's peak lr; its schedule has AdamW's shape
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    muon_ns_steps: int = 5  # Newton-Schulz iterations that orthogonalise each update
    # devices: mesh axes ("data", "fsdp"); data * fsdp devices are used
    data_parallel: int = 1  # size of the "data" axis (pure replication)
    fsdp: int = -1  # size of the "fsdp" axis; -1 means all devices left
    fsdp_min_size: int = 2**18  # arrays with fewer elements are replicated, not sharded
    # evaluation, logging, checkpoints
    eval_interval: int = 2000  # steps between evaluations (and checkpoints)
    eval_iters: int = 200  # batches per evaluation, the same batches every time
    log_interval: int = 10  # steps between console/TensorBoard lines (the only host syncs)
    keep_checkpoints: int = 3  # latest checkpoints kept, plus the best by val loss
    seed: int = 1337  # parameters, dropout and batch order
    init_from: str = ""  # GPT-2 weights to start from: a directory, or gpt2, gpt2-medium, ...
    hellaswag: str = ""  # a HellaSwag jsonl scored at each eval_interval (GPT-2 BPE data only)
    # GPT-2 124M does not rerun bit for bit on a GPU without it (BENCHMARKS.md, "Determinism")
    deterministic: bool = False  # XLA's deterministic GPU kernels: exact reruns, ~10% slower
    profile_steps: int = 5  # steps traced by --debug
    target_val_loss: float = 0.0  # stop at the first evaluation with val loss <= this; 0: off

    def __post_init__(self):
        """Refuses values that cannot be right, naming the field (launch.py: one line, exit 2)."""
        at_least = {"batch_size": 1, "grad_accum": 1, "max_steps": 1, "warmup_steps": 0,
                    "lr_decay_steps": 0, "data_parallel": 1, "fsdp_min_size": 0,
                    "eval_interval": 1, "eval_iters": 1, "log_interval": 1,
                    "keep_checkpoints": 1, "seed": 0, "profile_steps": 1, "muon_ns_steps": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= {low}")
        for name in ("learning_rate", "weight_decay", "grad_clip", "min_lr", "muon_learning_rate",
                     "target_val_loss"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be a number >= 0")
        if self.seed >= 2**63:  # jax.random.key takes a signed 64-bit seed
            raise ValueError(f"seed={self.seed}: must be < 2**63")
        if self.learning_rate == 0:
            raise ValueError("learning_rate=0: must be > 0")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr}: must not exceed learning_rate="
                             f"{self.learning_rate}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer={self.optimizer!r}: use 'adamw' or 'muon'")
        if self.muon_learning_rate == 0:
            raise ValueError("muon_learning_rate=0: must be > 0")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1)")
        if self.fsdp != -1 and self.fsdp < 1:
            raise ValueError(f"fsdp={self.fsdp}: must be >= 1, or -1 for all devices left")

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.batch_size * self.model.block_size


# ---------------------------------------------------------------------------------------------
# Mesh and sharding


def make_mesh(config: TrainConfig) -> jax.sharding.Mesh:
    n_devices = jax.device_count()
    fsdp = n_devices // config.data_parallel if config.fsdp == -1 else config.fsdp
    used = config.data_parallel * fsdp
    if fsdp < 1 or used > n_devices:
        needed = config.data_parallel * max(config.fsdp, 1)  # fsdp=-1 takes what is left: >= 1
        raise UserError(
            f"data_parallel={config.data_parallel} x fsdp={config.fsdp} needs "
            f"{'at least ' * (config.fsdp == -1)}{needed} devices, {n_devices} found: "
            "lower --data_parallel or --fsdp"
        )
    if config.batch_size % used:  # checked here only: the rows also divide over the hosts then
        raise UserError(f"batch_size={config.batch_size} does not divide over the {used} devices "
                        f"it is split over: use a multiple of {used}")
    devices = jax.devices()[:used]
    # Auto axes: XLA's partitioner places activations and collectives from the parameter and
    # batch shardings (newer jax defaults to explicit sharding-in-types, which vmap'd code fights).
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((config.data_parallel, fsdp), ("data", "fsdp"), auto, devices=devices)


def check_attention(config) -> None:
    """attention="cudnn" runs only on NVIDIA GPUs: say so before the run directory is made."""
    if config.model.attention == "cudnn" and jax.devices()[0].platform != "gpu":
        raise UserError(f"model.attention=cudnn needs an NVIDIA GPU with cuDNN, and this machine "
                        f"runs on {jax.devices()[0].platform}: use --model.attention=auto or xla")


def names_on(path) -> set:
    """The attribute names (and dict keys) along a pytree path."""
    return {getattr(key, "name", getattr(key, "key", None)) for key in path}


def in_block_stack(path) -> bool:
    """Arrays under .blocks carry a leading n_layer axis (blocks are stacked and scanned)."""
    return "blocks" in names_on(path)


def shardings_of(abstract_tree):
    return jax.tree.map(lambda x: x.sharding, abstract_tree)


def fsdp_rule(mesh, min_size: int):
    """The one FSDP rule: shard a big array over "fsdp" on its largest divisible axis.

    Blocks are stacked (leading n_layer axis) and scanned; sharding that axis would make every
    layer gather the whole stack, so it is never chosen. The optimizer state has the same shapes
    and paths as its parameter (under .mu, .nu, ...), so the same rule places it alongside.
    """
    n_shards = mesh.shape["fsdp"]

    def sharding(path, leaf) -> NamedSharding:
        shape = leaf.shape
        first = 1 if in_block_stack(path) else 0
        axes = [a for a in range(first, len(shape)) if shape[a] % n_shards == 0]
        if n_shards == 1 or math.prod(shape) < min_size or not axes:
            return NamedSharding(mesh, P())
        axis = max(axes, key=lambda a: shape[a])
        return NamedSharding(mesh, P(*[("fsdp" if a == axis else None) for a in range(len(shape))]))

    return lambda tree: jax.tree_util.tree_map_with_path(sharding, tree)


def batch_sharding(mesh) -> NamedSharding:
    # (grad_accum, batch, seq): the batch rows are split over every device.
    return NamedSharding(mesh, P(None, ("data", "fsdp"), None))


# ---------------------------------------------------------------------------------------------
# Optimizer


def optimizer_labels(config: TrainConfig):
    """A function of the params: 'muon' for the blocks' matrices when config.optimizer is "muon",
    'decay' for every other matrix (ndim >= 2 in the unstacked model), 'no_decay' for norm gains
    and biases. A GPT is itself callable, so optax needs a function here, not a tree."""

    def label(path, leaf):
        if leaf.ndim - in_block_stack(path) < 2:
            return "no_decay"
        return "muon" if config.optimizer == "muon" and in_block_stack(path) else "decay"

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


def lr_schedule(config: TrainConfig) -> optax.Schedule:
    decay_steps = config.lr_decay_steps or config.max_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(decay_steps, config.warmup_steps + 1),
        end_value=config.min_lr,
    )


def muon(config: TrainConfig) -> optax.GradientTransformation:
    """Muon (Jordan et al. 2024): Nesterov momentum, orthogonalised by Newton-Schulz, per layer.

    Each leaf is (n_layer, d_in, d_out): the layer axis is a batch axis, so every layer's matrix
    is orthogonalised on its own, and q, k and v each on their own (split_qkv). Updates are
    scaled by sqrt(max(1, d_out/d_in)), as Muon's reference does, so wide and tall matrices take
    comparable steps.
    """
    per_layer = lambda updates: jax.tree.map(  # noqa: E731
        lambda _: optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2), updates)
    by_shape = lambda updates, params=None: jax.tree.map(  # noqa: E731
        lambda u: u * math.sqrt(max(1.0, u.shape[-1] / u.shape[-2])), updates)
    return split_qkv(optax.chain(
        optax.contrib.scale_by_muon(beta=config.muon_momentum, ns_steps=config.muon_ns_steps,
                                    nesterov=True, weight_dimension_numbers=per_layer),
        optax.stateless(by_shape),
    ))


def split_qkv(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """inner sees each fused (layer, d, 3d) qkv array as (3 * layer, d, d): q, k and v apart.
    Val -0.012 at 2000 steps against the fused matrix, both seeds (BENCHMARKS.md "Muon")."""

    def apart(path, a):
        if "qkv" not in names_on(path):
            return a
        layers, d_in, d_out = a.shape
        return a.reshape(layers, d_in, 3, d_out // 3).swapaxes(1, 2).reshape(-1, d_in, d_out // 3)

    def fused(path, a, like):
        if "qkv" not in names_on(path):
            return a
        layers, d_in, d_out = like.shape
        return a.reshape(layers, 3, d_in, d_out // 3).swapaxes(1, 2).reshape(like.shape)

    view = lambda tree: jax.tree_util.tree_map_with_path(apart, tree)  # noqa: E731

    def update(updates, state, params=None):
        new, state = inner.update(view(updates), state, None if params is None else view(params))
        return jax.tree_util.tree_map_with_path(fused, new, updates), state

    return optax.GradientTransformation(lambda params: inner.init(view(params)), update)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """clip -> per label: Adam (or Muon) and decoupled weight decay -> scale by the scheduled lr.

    One schedule for all: Muon's peak lr enters as its ratio to AdamW's, so both follow the same
    warmup and cosine, and weight decay is weight_decay * lr(t) of each one's own lr.
    """
    # Independent decay (Wortsman et al. 2023, "Small-scale proxies") wants weight_decay *
    # lr(t)/peak instead of weight_decay * lr(t): a constant divided by the peak.
    adam_decay = muon_decay = config.weight_decay
    if config.independent_weight_decay:
        adam_decay = config.weight_decay / config.learning_rate
        muon_decay = config.weight_decay / config.muon_learning_rate
    adam = optax.scale_by_adam(b1=config.beta1, b2=config.beta2)
    transforms = {"decay": optax.chain(adam, optax.add_decayed_weights(adam_decay)),
                  "no_decay": adam}
    if config.optimizer == "muon":
        transforms["muon"] = optax.chain(muon(config), optax.add_decayed_weights(muon_decay),
                                         optax.scale(config.muon_learning_rate / config.learning_rate))
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    by_label = optax.multi_transform(transforms, optimizer_labels(config))
    return optax.chain(clip, by_label, optax.scale_by_learning_rate(lr_schedule(config)))


# ---------------------------------------------------------------------------------------------
# Model and optimizer state, created or restored already sharded


def abstract_state(config: TrainConfig, mesh):
    """Shapes, dtypes and shardings of (params, opt_state), plus the model's static part."""
    abstract_model = eqx.filter_eval_shape(GPT, config.model, key=jr.key(0))
    is_shape = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    params, static = eqx.partition(abstract_model, is_shape)
    optimizer = make_optimizer(config)
    opt_state = jax.eval_shape(optimizer.init, params)
    shard = fsdp_rule(mesh, config.fsdp_min_size)
    attach = lambda tree: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shard(tree)
    )
    return attach(params), attach(opt_state), static, optimizer


def init_state(config: TrainConfig, abstract_params, abstract_opt, optimizer):
    """Initialises every parameter directly into its shard: no device ever holds the whole model.
    With init_from, the parameters are GPT-2's, read on the host and placed into their shards."""
    if config.init_from:
        pretrained, _ = gpt2.load(config.init_from, config.model)
        params = jax.device_put(eqx.filter(pretrained, eqx.is_array), shardings_of(abstract_params))
    else:
        make_params = lambda key: eqx.filter(GPT(config.model, key=key), eqx.is_array)  # noqa: E731
        params = jax.jit(make_params, out_shardings=shardings_of(abstract_params))(jr.key(config.seed))
    opt_state = jax.jit(optimizer.init, out_shardings=shardings_of(abstract_opt))(params)
    return params, opt_state


# ---------------------------------------------------------------------------------------------
# The step


def make_train_step(config: TrainConfig, optimizer, abstract_params):
    schedule = lr_schedule(config)
    param_shardings = shardings_of(abstract_params)

    @eqx.filter_jit(donate="all")
    def train_step(model, opt_state, tokens, targets, step, key_data):
        """One optimizer step over grad_accum micro-batches; metrics stay on device."""
        params = eqx.filter(model, eqx.is_array)
        key = jr.fold_in(jr.wrap_key_data(key_data), step)  # dropout: a function of (seed, step)

        def loss_and_grads(x, y, micro_key):
            return eqx.filter_value_and_grad(loss_fn)(model, x, y, key=micro_key)

        def accumulate(grad_sum, micro_batch):
            loss, grads = loss_and_grads(*micro_batch)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        micro_keys = jr.split(key, config.grad_accum)
        if config.grad_accum == 1:  # no accumulator to zero, carry and copy through a loop
            losses, grads = loss_and_grads(tokens[0], targets[0], micro_keys[0])
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            grad_sum, losses = jax.lax.scan(accumulate, zeros, (tokens, targets, micro_keys))
            grads = jax.tree.map(lambda g: g / config.grad_accum, grad_sum)
        # Gradients land sharded like their parameters (a reduce-scatter, not an all-reduce).
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        grad_norm = optax.tree_utils.tree_norm(grads)
        metrics = {"loss": losses.mean(), "grad_norm": grad_norm, "lr": schedule(step)}
        return model, opt_state, metrics

    return train_step


@eqx.filter_jit
def eval_step(model, tokens, targets):
    return loss_fn(model, tokens[0], targets[0])


def evaluate(model, samplers: dict, config: TrainConfig, to_global, show=False) -> dict[str, float]:
    """Mean loss over the same eval_iters batches of each split every time: comparable over a run.
    show: a short progress bar per split (it counts batches sent, not finished: no sync)."""
    losses = {}
    for split, sampler in samplers.items():
        batches = tqdm(range(config.eval_iters), desc=f"eval {split}", unit="batch", leave=False,
                       file=sys.stdout, disable=not show, **bar_width())
        batch_losses = [eval_step(model, *map(to_global, sampler.batch(i))) for i in batches]
        losses[split] = jax.device_get(jnp.mean(jnp.stack(batch_losses))).item()  # one sync
    return losses


# ---------------------------------------------------------------------------------------------
# The run directory's config: what it holds, what a resume may change, the model it restores


def read_run_config(rundir: Path) -> TrainConfig:
    """The resolved config a run directory's config.json holds."""
    path = Path(rundir) / "config.json"
    if not path.exists():
        raise UserError(f"{rundir} is not a run directory (no config.json): check --rundir")
    try:
        fields = json.loads(path.read_text())["config"]
        return TrainConfig(**{**fields, "model": GPTConfig(**fields["model"])})
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a valid eqxgpt config ({e}): check --rundir") from None


# What a resume may change. Any setting may, and the new value takes effect (logged, and kept in
# config.json's history), except those the checkpoint fixes, where a new value could not:
REFUSED_ON_RESUME = {
    "seed": "batches and dropout keep the checkpoint's seed",
    "init_from": "the weights come from the checkpoint",
    "optimizer": "the checkpoint holds the state of the optimizer it was trained with",
}
# ... and the model, except how the same function is computed (not what it computes).
MODEL_MAY_CHANGE_ON_RESUME = ("attention", "remat", "unroll_layers")


def check_rundir(config: TrainConfig, rundir: Path, meta: dict | None = None) -> dict:
    """Refuses a run directory that config cannot run in, before anything is written into it:
    a file, another model, other data (meta), a setting a resume cannot change. Returns the
    settings a resume changes, {name: (old, new)}."""
    if rundir.exists() and not rundir.is_dir():
        raise UserError(f"--rundir={rundir} is a file, not a run directory: pass a directory")
    checkpoint_dir = rundir / "checkpoints"
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir} is a file where the run's checkpoints belong: move it away")
    if not (rundir / "config.json").exists():
        if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
            raise UserError(f"{rundir} has checkpoints but no config.json: use a new --rundir")
        return {}
    previous = read_run_config(rundir)
    changed = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in MODEL_MAY_CHANGE_ON_RESUME
               and getattr(previous.model, f.name) != getattr(config.model, f.name)]
    if changed:
        raise UserError(f"{rundir} holds a run of a different model (model.{', model.'.join(changed)} "
                        "differ): use a new --rundir or the original config")
    recorded = json.loads((rundir / "config.json").read_text()).get("data")
    for split in data.SPLITS if meta is not None and isinstance(recorded, dict) else ():
        was, now = recorded.get(f"{split}_sha256"), meta.get(f"{split}_sha256")
        if was and now and was != now:
            raise UserError(f"{config.data_dir} holds other data than the run in {rundir} was "
                            f"trained on ({split}.bin's sha256 differs from its config.json): the "
                            "token ids would mean other tokens; start a new --rundir")
    old = {**dataclasses.asdict(previous), **flat_model(previous)}
    new = {**dataclasses.asdict(config), **flat_model(config)}
    changes = {name: (old.get(name), value) for name, value in new.items()
               if name != "model" and old.get(name) != value}
    for name, why in REFUSED_ON_RESUME.items():
        if name in changes:
            raise UserError(f"{rundir} was trained with {name}={changes[name][0]!r}, and "
                            f"{name}={changes[name][1]!r} cannot take effect on resume ({why}): "
                            f"keep {name}, or start a new --rundir")
    return changes


def flat_model(config: TrainConfig) -> dict:
    return {f"model.{name}": value for name, value in dataclasses.asdict(config.model).items()}


def load_model(rundir, which: str | int = "latest") -> tuple[TrainConfig, GPT]:
    """The trained model of a run (parameters only, no optimizer state) on the devices present;
    which: a step the caller has chosen with checkpoints.choose_step, or a name it takes."""
    rundir = Path(rundir)
    config = read_run_config(rundir)
    step = which if isinstance(which, int) else checkpoints.choose_step(rundir, which)
    # Whatever devices are here now (a run trained on 8 GPUs samples on 1 CPU): FSDP over all.
    config = dataclasses.replace(config, data_parallel=1, fsdp=-1, batch_size=jax.device_count())
    abstract_params, _, static, _ = abstract_state(config, make_mesh(config))
    manager = checkpoints.checkpoint_manager(rundir)
    params, _, _ = checkpoints.restore_checkpoint(manager, step, abstract_params)
    return config, eqx.combine(params, static)


# ---------------------------------------------------------------------------------------------
# Throughput, as the loop logs it and bench.py prints it


# Per device, from datasheets: dense bf16 peak FLOP/s (for MFU) and memory bandwidth in bytes/s
# (bench.py --decode's bound). A device not listed (a CPU) reports neither.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
MEMORY_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def this_device(table: dict) -> float | None:
    """This machine's entry in PEAK_FLOPS or MEMORY_BANDWIDTH, or None."""
    kind = jax.devices()[0].device_kind
    return next((value for name, value in table.items() if name in kind), None)


def throughput(config: TrainConfig, seconds_per_step: float, devices: int):
    """(tokens/s, MFU): MFU is the FLOP/s of the model (flops_per_token: 6N + 12LdT, PaLM) over
    the peak of the devices the step runs on, None where the peak is unknown."""
    tokens_per_s = config.tokens_per_step / seconds_per_step
    peak = this_device(PEAK_FLOPS)
    mfu = tokens_per_s * flops_per_token(config.model) / (peak * devices) if peak else None
    return tokens_per_s, mfu


# ---------------------------------------------------------------------------------------------
# The loop


def check_finite(pending: list, last_good: int | None) -> list[tuple[int, dict]]:
    """Reads the metrics held on device (the loop's only host sync); stops on NaN/inf."""
    steps = [step for step, _ in pending]
    rows = list(zip(steps, jax.device_get([metrics for _, metrics in pending])))  # one transfer
    for step, metrics in rows:
        for name in ("loss", "grad_norm"):
            if math.isfinite(float(metrics[name])):
                continue
            kept = (f"the last good checkpoint (step {last_good}) is kept" if last_good
                    else "no checkpoint was written")
            raise UserError(f"{name.replace('_', ' ')} is {float(metrics[name])} at step {step + 1}; "
                            f"{kept}: lower --learning_rate or raise --warmup_steps")
    pending.clear()
    return rows


def open_data(config: TrainConfig, mesh):
    """(meta, train batches, the two eval splits' batches, to_global) over the prepared dataset."""
    meta = data.load_meta(config.data_dir)
    if config.model.vocab_size < meta["vocab_size"]:
        raise UserError(f"model.vocab_size={config.model.vocab_size} is smaller than the data's "
                        f"vocabulary ({meta['vocab_size']}): raise --model.vocab_size")
    if config.init_from and meta["tokenizer"] != "gpt2":
        raise UserError(f"init_from={config.init_from} needs data in GPT-2's BPE, and "
                        f"{config.data_dir} is tokenized '{meta['tokenizer']}': prepare it with "
                        "--tokenizer gpt2")
    if config.hellaswag:  # read now: a bad file is refused before anything is written
        if meta["tokenizer"] != "gpt2":
            raise UserError(f"hellaswag={config.hellaswag} is scored in GPT-2's BPE, and "
                            f"{config.data_dir} is tokenized '{meta['tokenizer']}': drop --hellaswag")
        evaluation.read_hellaswag(config.hellaswag, config.model.block_size)

    def sampler(split, seed, grad_accum):
        if meta[f"{split}_tokens"] == 0:
            raise UserError(f"the {split} split of {config.data_dir} is empty: prepare the dataset "
                            "from more text")
        tokens = data.open_split(config.data_dir, split, meta)
        return data.BatchSampler(tokens, config.model.block_size, config.batch_size, grad_accum,
                                 seed, jax.process_index(), jax.process_count(),
                                 example_length=meta.get("example_length"),
                                 loss_mask=meta.get("loss_mask"), vocab_size=meta["vocab_size"])

    train_batches = sampler("train", config.seed, config.grad_accum)
    eval_batches = {"train": sampler("train", config.seed + 1, 1),
                    "val": sampler("val", config.seed + 2, 1)}
    sharding = batch_sharding(mesh)

    def to_global(local):  # this process's rows -> one array over all devices of all hosts
        global_shape = (local.shape[0], config.batch_size, local.shape[2])
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return meta, train_batches, eval_batches, to_global


def create_or_restore_state(config: TrainConfig, abstract, manager, train_batches):
    """(model, opt_state, dropout key data, step): restored from the latest checkpoint (which
    also moves train_batches on to its step), else initialised (or GPT-2's, with init_from)."""
    abstract_params, abstract_opt, static, optimizer = abstract
    step = None if manager is None else manager.latest_step()
    if step is None:
        params, opt_state = init_state(config, abstract_params, abstract_opt, optimizer)
        step, key_data = 0, np.asarray(jr.key_data(jr.key(config.seed)))
    else:
        params, opt_state, run_state = checkpoints.restore_checkpoint(manager, step, abstract_params,
                                                                      abstract_opt)
        train_batches.load_state_dict(run_state["sampler"])
        key_data = np.asarray(run_state["key"], np.uint32)
    return eqx.combine(params, static), opt_state, key_data, step


@contextlib.contextmanager
def run_outputs(config: TrainConfig, rundir: Path, meta: dict, start: int, changes: dict):
    """(log, scalar, bar), after config.json is written (with this resume's changes in its
    history): log(line) prints a line and appends it to log.txt; scalar(name, value, step) writes
    a TensorBoard scalar; bar is the tqdm progress bar (off when stdout is no terminal). Only
    process 0 writes. With the bar on, per-step lines go to log.txt only (the bar shows them) and
    other lines are printed above it; log.txt never receives the bar's redraws."""
    if jax.process_index() != 0:
        yield (lambda line, step_line=False: None), (lambda name, value, step: None), tqdm(disable=True)
        return
    path = rundir / "config.json"
    history = json.loads(path.read_text()).get("history", []) if path.exists() else []
    if changes:
        history.append({"step": start, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "changes": {name: list(values) for name, values in changes.items()}})
    rundir.mkdir(parents=True, exist_ok=True)
    checkpoints.write_json_atomic(path, {
        "config": dataclasses.asdict(config), "git_commit": checkpoints.git_commit(),
        "data": {"dir": config.data_dir, "train_sha256": meta.get("train_sha256"),
                 "val_sha256": meta.get("val_sha256")},
        "history": history,  # resumes that changed settings: {step, time, changes}
    })
    writer = summary_writer(rundir)
    writer.add_text("config", "```\n" + json.dumps(dataclasses.asdict(config), indent=2) + "\n```")
    bar = tqdm(total=config.max_steps, unit="step", file=sys.stdout, **bar_width(),
               disable=not sys.stdout.isatty(), desc="compiling...")
    with open(rundir / "log.txt", "a") as log_file, writer, bar:

        def log(line: str, step_line: bool = False):
            log_file.write(line + "\n")
            log_file.flush()
            if bar.disable:
                print(line, flush=True)
            elif not step_line:
                bar.write(line, file=sys.stdout)

        yield log, writer.add_scalar, bar


def summary_writer(rundir: Path):
    """tensorboardX's SummaryWriter, imported here (only process 0 writes events) and without
    torch: tensorboardX imports torch whenever it is installed, only to recognise torch tensors,
    which we never log; that import alone took ~1.5 s of every start (BENCHMARKS.md "Startup")."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter(str(rundir))


def evaluate_tasks(model, config: TrainConfig, meta: dict, step: int, log, scalar) -> None:
    """What the run is asked to score besides its loss: exact match of greedy completions (the
    dataset's completion_eval, meta.json) and HellaSwag (config.hellaswag); logged, and written
    to TensorBoard under eval/."""
    if "completion_eval" in meta:
        match = evaluation.exact_match(model, meta, config.data_dir, "val")
        log(f"step {step} | exact match on val: {100 * match['accuracy']:.2f}% ({match['correct']:,} "
            f"of {match['total']:,} examples, greedy)")
        scalar("eval/exact_match", match["accuracy"], step)
    if config.hellaswag:
        items = evaluation.read_hellaswag(config.hellaswag, config.model.block_size)  # read once
        # batch_size // 4 items of 4 endings: no more rows than a training micro-batch
        scores = evaluation.hellaswag_scores(model, items, max(1, config.batch_size // evaluation.ENDINGS),
                                             vocab_limit=meta["vocab_size"])
        log(f"step {step} | hellaswag: acc {scores['acc']:.4f} | acc_norm {scores['acc_norm']:.4f} "
            f"({scores['items']:,} items)")
        scalar("eval/hellaswag_acc", scores["acc"], step)
        scalar("eval/hellaswag_acc_norm", scores["acc_norm"], step)


def train(config: TrainConfig, rundir, *, debug: bool = False) -> GPT:
    """Trains (or resumes) the run in rundir; returns the final model. debug: a profile of a few
    steps, and no checkpoints."""
    rundir = Path(rundir)
    # Everything that can refuse the run does so before anything is written.
    check_attention(config)
    mesh = make_mesh(config)
    meta, train_batches, eval_batches, to_global = open_data(config, mesh)
    changes = check_rundir(config, rundir, meta)
    with contextlib.ExitStack() as stack:  # what is entered below is left in reverse order
        stack.enter_context(checkpoints.rundir_lock(rundir))
        stack.enter_context(checkpoints.disk_full_is_user_error(rundir))
        manager, set_aside = None, []
        if not debug:
            manager, set_aside = checkpoints.open_checkpoints(rundir, config.keep_checkpoints)
            stack.callback(manager.close)  # waits until the last save is on disk
        abstract = abstract_state(config, mesh)
        model, opt_state, key_data, start = create_or_restore_state(config, abstract, manager,
                                                                    train_batches)
        if start >= config.max_steps:  # a finished run, started again: nothing to write
            if jax.process_index() == 0:
                print(f"nothing to do: {rundir} is at step {start} of max_steps={config.max_steps} "
                      "(raise --max_steps to train on)", flush=True)
            return model
        abstract_params, _, _, optimizer = abstract
        train_step = make_train_step(config, optimizer, abstract_params)
        log, scalar, bar = stack.enter_context(run_outputs(config, rundir, meta, start, changes))
        if set_aside:
            log(f"incomplete checkpoints (a crash mid-save) moved to "
                f"{rundir / 'incomplete_checkpoints'}: step directories {', '.join(set_aside)}")
        if changes:
            log("resumed with " + ", ".join(f"{name} {old!r} -> {new!r}"
                                            for name, (old, new) in changes.items()))
        if config.warmup_steps >= config.max_steps:  # a short try run: never refused for it
            log(f"warmup_steps={config.warmup_steps} >= max_steps={config.max_steps}: the run ends "
                f"inside the warmup, its last step at lr "
                f"{float(lr_schedule(config)(config.max_steps - 1)):.2e} of the peak "
                f"{config.learning_rate:.2e}")
        log(f"{'resuming at' if start else 'starting'} step {start}/{config.max_steps} | "
            f"{num_params(model, non_embedding=True) / 1e6:.2f}M non-embedding params | mesh "
            f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices"
            f"{f' in {jax.process_count()} processes' * (jax.process_count() > 1)} | "
            f"{config.tokens_per_step:,} tokens/step | rundir {rundir}")
        batches = stack.enter_context(contextlib.closing(train_batches.prefetch()))
        stop_requested = stack.enter_context(checkpoints.preemption_notice(manager))

        step, last_saved, pending = start, (start or None), []  # pending: metrics still on device
        # ms/step counts from step_timer over the steps since timed_from: compilation, profiling
        # and evaluations are not step time (nor are they training time to target_val_loss)
        step_timer, timed_from = time.perf_counter(), start
        run_clock, compile_seconds, eval_seconds, evaluations = time.perf_counter(), 0.0, 0.0, 0
        profiling = False

        def save(val_loss=None):
            run_state = {"step": step, "sampler": train_batches.state_dict(),
                         "key": key_data.tolist(), "val_loss": val_loss}
            checkpoints.save_checkpoint(manager, step, eqx.filter(model, eqx.is_array), opt_state,
                                        run_state, val_loss=val_loss)

        def flush():
            """Reads the pending metrics (one sync), stops on NaN, writes each step's scalars."""
            rows = check_finite(pending, last_saved)
            for row_step, row in rows:
                for name in ("loss", "lr", "grad_norm"):
                    scalar(f"train/{name}", float(row[name]), row_step + 1)
            return rows

        bar.update(start)
        try:
            while step < config.max_steps:
                # step: one optimizer step; its metrics stay on device until the next log line
                tokens, targets = next(batches)
                model, opt_state, metrics = train_step(
                    model, opt_state, to_global(tokens), to_global(targets), np.int32(step), key_data)
                pending.append((step, metrics))
                step += 1
                bar.update(1)  # host-side only: the bar reads no metric here
                if step == start + 1:  # the first step compiles: not step time, nor profiled
                    jax.block_until_ready(metrics)
                    compile_seconds = time.perf_counter() - step_timer
                    log(f"step {step}: compiled and ran in {compile_seconds:.1f}s")
                    bar.set_description("training")
                    if debug:
                        jax.profiler.start_trace(str(rundir / "profile"))
                        profiling = True
                    step_timer, timed_from = time.perf_counter(), step
                if profiling and step >= start + 1 + config.profile_steps:
                    jax.block_until_ready(model)
                    jax.profiler.stop_trace()
                    profiling = False
                    log(f"profile of steps {start + 2}-{step} written to {rundir / 'profile'}")
                    step_timer, timed_from = time.perf_counter(), step

                # log: every log_interval steps, one host sync reads the metrics since the last
                if step % config.log_interval == 0 or step == config.max_steps:
                    rows = flush()
                    if step > timed_from and rows:
                        seconds = (time.perf_counter() - step_timer) / (step - timed_from)
                        tokens_per_s, mfu = throughput(config, seconds, mesh.size)
                        last = {name: float(value) for name, value in rows[-1][1].items()}
                        log(f"step {step} | loss {last['loss']:.4f} | lr {last['lr']:.2e} | grad "
                            f"norm {last['grad_norm']:.3f} | {seconds * 1e3:.1f} ms/step | "
                            f"{tokens_per_s:,.0f} tok/s | MFU {f'{100 * mfu:.1f}%' if mfu else 'n/a'}",
                            step_line=True)
                        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                        scalar("perf/ms_per_step", seconds * 1e3, step)
                        scalar("perf/tokens_per_s", tokens_per_s, step)
                        if mfu:
                            scalar("perf/mfu", mfu, step)
                    step_timer, timed_from = time.perf_counter(), step

                # evaluate and save: every eval_interval steps, and after the last
                if step % config.eval_interval == 0 or step == config.max_steps:
                    flush()
                    eval_start = time.perf_counter()
                    losses = evaluate(model, eval_batches, config, to_global, show=not bar.disable)
                    log(f"step {step} | eval: train {losses['train']:.4f} | val {losses['val']:.4f}")
                    scalar("eval/train_loss", losses["train"], step)
                    scalar("eval/val_loss", losses["val"], step)
                    if manager is not None:
                        save(val_loss=losses["val"])
                        last_saved = step
                    evaluate_tasks(model, config, meta, step, log, scalar)
                    step_timer += time.perf_counter() - eval_start
                    eval_seconds += time.perf_counter() - eval_start
                    evaluations += 1
                    if losses["val"] <= config.target_val_loss:
                        seconds = time.perf_counter() - run_clock - compile_seconds - eval_seconds
                        log(f"step {step} | reached val {losses['val']:.4f} <= target_val_loss="
                            f"{config.target_val_loss} after {seconds:.1f}s of training (the first "
                            f"step's {compile_seconds:.1f}s with compilation and {evaluations} "
                            f"evaluations' {eval_seconds:.1f}s not counted); stopping")
                        scalar("eval/seconds_to_target", seconds, step)
                        break

                # stop: SIGTERM (a preemption) saves the step just finished and exits 0, so the
                # scheduler's restart resumes right here; Ctrl-C saves it below, then exits 130
                stop = stop_requested(step) if step < config.max_steps else None
                if stop == "SIGINT":
                    raise KeyboardInterrupt
                if stop:
                    if manager is not None and step != last_saved:
                        flush()
                        save()
                        manager.wait_until_finished()  # on disk before the exit
                    log(f"stopped by SIGTERM at step {step}" + (", checkpoint saved; rerun with "
                        f"--rundir={rundir} to resume" if manager else " (--debug: no checkpoints)"))
                    break
        except KeyboardInterrupt:
            # Ctrl-C keeps the work: the step just finished is saved, a rerun resumes from it. A
            # second Ctrl-C inside a step leaves its donated inputs deleted: nothing to save then.
            deleted = any(a.is_deleted() for a in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
            if manager is not None and step != last_saved and not deleted:
                flush()
                save()
                log(f"interrupted: checkpoint saved at step {step}; rerun with --rundir={rundir} "
                    "to resume")
            raise
    return model
