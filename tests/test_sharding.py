"""The FSDP rule, read off an abstract mesh: no devices, so it runs in the fast suite anywhere."""

import jax
import jax.random as jr
import equinox as eqx
import pytest
from jax.sharding import AbstractMesh

from model import GPT, GPTConfig
from sharding import fsdp_rule

# 16 layers, so the stacked layer axis is the largest axis of every norm gain: a rule that may
# split it would split it there.
CONFIG = GPTConfig(vocab_size=32, block_size=8, n_layer=16, n_head=2, n_embd=8)
F = "fsdp"
# Each array's placement over 4 shards: the largest axis that 4 divides, never the layer axis.
PLACEMENT = {
    ".embed": (F, None),  # (32, 8)
    ".blocks.attn_norm.weight": (None, F),  # (16, 8)
    ".blocks.attn.qkv.weight": (None, None, F),  # (16, 8, 24)
    ".blocks.attn.proj.weight": (None, F, None),  # (16, 8, 8): the first of equal axes
    ".blocks.attn.q_norm.weight": (None, F),  # (16, 4)
    ".blocks.attn.k_norm.weight": (None, F),
    ".blocks.mlp_norm.weight": (None, F),
    ".blocks.mlp.fc.weight": (None, None, F),  # (16, 8, 32)
    ".blocks.mlp.proj.weight": (None, F, None),  # (16, 32, 8)
    ".final_norm.weight": (F,),  # (8,)
}


def placements(min_size: int) -> dict:
    abstract = eqx.filter_eval_shape(GPT, CONFIG, key=jr.key(0))
    params = eqx.filter(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    shardings = fsdp_rule(AbstractMesh((1, 4), ("data", F)), min_size)(params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return {path: tuple(s.spec) for path, s in zip(paths, jax.tree.leaves(shardings))}


def test_fsdp_splits_each_array_on_its_largest_divisible_axis_never_the_layer_axis():
    assert placements(min_size=0) == PLACEMENT


@pytest.mark.parametrize("min_size", [129, 10**6])
def test_arrays_under_fsdp_min_size_stay_whole(min_size):
    sizes = {".embed": 256, ".blocks.attn_norm.weight": 128, ".blocks.attn.qkv.weight": 3072,
             ".blocks.attn.proj.weight": 1024, ".blocks.attn.q_norm.weight": 64,
             ".blocks.attn.k_norm.weight": 64, ".blocks.mlp_norm.weight": 128,
             ".blocks.mlp.fc.weight": 4096, ".blocks.mlp.proj.weight": 4096, ".final_norm.weight": 8}
    expected = {path: PLACEMENT[path] if sizes[path] >= min_size else () for path in PLACEMENT}
    assert placements(min_size) == expected
