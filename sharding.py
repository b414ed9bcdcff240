"""The device mesh and the one FSDP rule: which devices hold which part of every array.

The mesh has two named axes, ("data", "fsdp"). A parameter with at least fsdp_min_size elements
is split over "fsdp" on its largest divisible axis, the rest replicated; the optimizer state
follows its parameter, and the batch rows are split over both axes. train.py places the state
with these shardings; checkpoints.py restores a run's parameters with them on whatever devices
are present.
"""

import math

import equinox as eqx
import jax
import jax.random as jr
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cli import UserError
from config import TrainConfig
from model import GPT, GPTConfig, in_block_stack


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


def shardings_of(abstract_tree):
    return jax.tree.map(lambda x: x.sharding, abstract_tree)


def with_shardings(tree, mesh, min_size: int):
    """The shapes and dtypes of tree's arrays, each with the sharding the FSDP rule gives it."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, fsdp_rule(mesh, min_size)(tree))


def abstract_model(model_config: GPTConfig, mesh, min_size: int):
    """(the GPT's parameters as sharded shapes, its static part): nothing is allocated."""
    abstract = eqx.filter_eval_shape(GPT, model_config, key=jr.key(0))
    params, static = eqx.partition(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    return with_shardings(params, mesh, min_size), static
