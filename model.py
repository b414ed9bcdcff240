"""The GPT: a decoder-only transformer in Equinox, readable top to bottom.

Pre-norm blocks without biases; RMSNorm (Zhang & Sennrich 2019) instead of LayerNorm; rotary
position embeddings (Su et al. 2021) instead of learned positions; QK-norm (Dehghani et al. 2023)
to keep attention logits bounded at high learning rates. Parameters are stored in float32; the
forward pass casts them once to the compute dtype (bfloat16 by default) and keeps the numerically
delicate parts (norm statistics, softmax, logits, loss) in float32.

Modules act on ONE sequence, as in the Equinox examples; batch with `jax.vmap` (see `loss_fn`).
The blocks are created with `eqx.filter_vmap` (every block parameter has a leading n_layer axis)
and run with `jax.lax.scan`, so one block is compiled whatever the depth. One function,
`GPT.run_blocks`, runs them for training, prefill and decoding: the attention takes an optional
KV cache and hands back its new keys and values, so swapping the attention or the MLP is one class.
"""

import dataclasses
import functools
import math

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # longest sequence the model is trained on
    vocab_size: int = 0  # 0: the data's (meta.json); GPT-2's BPE padded to 50304 for faster matmuls
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads; head_dim = n_embd / n_head
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # on embeddings, attention output and MLP output
    attn_dropout: float = 0.0  # on attention probabilities, as nanoGPT's attn_dropout (XLA path)
    qk_norm: bool = True  # RMSNorm over head_dim on q and k before RoPE
    tie_embeddings: bool = True  # lm_head is the token embedding (one array, as in GPT-2)
    rope_base: float = 10000.0  # RoPE wavelength base (RoFormer)
    attention: str = "auto"  # "explicit" (written out below), "xla", "cudnn" (flash) or "auto"
    remat: bool = False  # recompute each block in the backward pass: less memory, ~1/3 more compute
    unroll_layers: bool = True  # unroll the layer scan when compiling: faster steps, longer compiles
    # "float16": with dynamic loss scaling (TrainConfig.loss_scale_*), for GPUs without bfloat16;
    # "auto": bfloat16 where the device has it, else float16 (pick_compute_dtype)
    compute_dtype: str = "bfloat16"  # "bfloat16", "float16", "float32" or "auto"; params: float32
    # Architecture switches; GPT-2 itself is GPT2_ARCHITECTURE (below), so its weights load
    position_embedding: str = "rope"  # "rope" (rotary, inside attention) or "learned" (GPT-2)
    norm: str = "rms"  # "rms" (RMSNorm, a gain only) or "layer" (LayerNorm, as GPT-2)
    bias: bool = False  # biases on every linear layer and LayerNorm (GPT-2 has them)
    norm_eps: float = 1e-6  # added to the variance in every norm (GPT-2: 1e-5)
    # relu2 (Primer; the speedrun's): a lower loss than GELU and a cheaper step on CPU
    # (BENCHMARKS.md "Model switches")
    mlp_activation: str = "gelu"  # "gelu" (tanh approximation, GPT-2) or "relu2": relu(x)**2
    # The speedrun's shortcuts (KellerJordan/modded-nanogpt) that paid on two corpora and two
    # seeds (BENCHMARKS.md "The recipe's third round"); off, the model is the one above, bit for bit
    value_embeds: bool = False  # token tables added into attention's values; block i and i + n_layer/2 share one
    bigram_embed: bool = False  # a (previous token, token) table added to the embedding; vocab_size <= 512

    def __post_init__(self):
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size={self.vocab_size}: must be >= 1, or 0 for the data's")
        if not self.rope_base > 1:
            raise ValueError(f"rope_base={self.rope_base}: must be > 1")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps={self.norm_eps}: must be > 0")
        if self.position_embedding not in ("rope", "learned"):
            raise ValueError(f"position_embedding={self.position_embedding!r}: use 'rope' or 'learned'")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm={self.norm!r}: use 'rms' or 'layer'")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size"
            )
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1)")
        if self.attention not in ("auto", "explicit", "xla", "cudnn"):
            raise ValueError(f"attention={self.attention!r}: use 'auto', 'explicit', 'xla' or 'cudnn'")
        if self.mlp_activation not in ("gelu", "relu2"):
            raise ValueError(f"mlp_activation={self.mlp_activation!r}: use 'gelu' or 'relu2'")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}: use 'bfloat16', 'float16', "
                             "'float32' or 'auto'")
        if self.bigram_embed and self.vocab_size > 512:  # (vocab_size + 1) x vocab_size rows
            raise ValueError(f"bigram_embed=True is for vocab_size <= 512 (a row per pair of "
                             f"tokens); vocab_size={self.vocab_size} is too large")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


COMPUTE_DTYPES = ("bfloat16", "float16", "float32", "auto")


def pick_compute_dtype(device) -> tuple[str, str]:
    """What compute_dtype="auto" means on device: (dtype, why). bfloat16, except on NVIDIA GPUs
    before Ampere (compute capability < 8.0: T4, V100), which have no fast bfloat16 and train in
    float16 with loss scaling instead."""
    capability = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    try:
        major_minor = float(capability)
    except (TypeError, ValueError):  # not an NVIDIA GPU (a CPU, a TPU, ROCm's "gfx90a")
        return "bfloat16", f"{device.platform} ({device.device_kind})"
    if major_minor < 8.0:
        return "float16", (f"{device.device_kind} has compute capability {capability} < 8.0: no "
                           "fast bfloat16; float16 with dynamic loss scaling")
    return "bfloat16", f"{device.device_kind} has compute capability {capability} >= 8.0"


def with_picked_dtype(config: GPTConfig, device) -> tuple[GPTConfig, str | None]:
    """config with compute_dtype="auto" made the device's pick, and a line saying which and why
    (None when the config named a dtype itself)."""
    if config.compute_dtype != "auto":
        return config, None
    dtype, why = pick_compute_dtype(device)
    return dataclasses.replace(config, compute_dtype=dtype), f"compute_dtype=auto: {dtype} ({why})"


# GPT-2 (Radford et al. 2019) as settings of the switches above: learned positions, LayerNorm
# with biases and epsilon 1e-5, biases on every linear layer, no QK-norm, tied head, and GELU in
# the tanh approximation, which jax.nn.gelu computes by default.
GPT2_ARCHITECTURE = dict(position_embedding="learned", norm="layer", bias=True, norm_eps=1e-5,
                         qk_norm=False, tie_embeddings=True, mlp_activation="gelu")


def padded_vocab(vocab_size: int) -> int:
    """A vocabulary rounded up to a multiple of 64 (GPT-2's 50257 -> 50304): faster matmuls, as
    nanoGPT pads it; the padding ids are never sampled."""
    return 64 * math.ceil(vocab_size / 64)


def dropout(x: Array, rate: float, key: PRNGKeyArray | None) -> Array:
    """Inverted dropout; the identity when key is None (inference) or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jr.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_key(key: PRNGKeyArray | None, n: int) -> list[PRNGKeyArray | None]:
    return [None] * n if key is None else list(jr.split(key, n))


class RMSNorm(eqx.Module):
    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = jnp.ones(dim, jnp.float32)
        self.eps = eps

    def __call__(self, x: Float[Array, "*shape dim"]) -> Float[Array, "*shape dim"]:
        x32 = x.astype(jnp.float32)  # statistics in float32 even under bf16 compute
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(eqx.Module):
    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"] | None
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, eps: float, bias: bool):
        self.weight = jnp.ones(dim, jnp.float32)
        self.bias = jnp.zeros(dim, jnp.float32) if bias else None
        self.eps = eps

    def __call__(self, x: Float[Array, "*shape dim"]) -> Float[Array, "*shape dim"]:
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        out = normed * self.weight.astype(jnp.float32)
        return (out if self.bias is None else out + self.bias.astype(jnp.float32)).astype(x.dtype)


def make_norm(config: "GPTConfig", dim: int) -> RMSNorm | LayerNorm:
    if config.norm == "layer":
        return LayerNorm(dim, config.norm_eps, config.bias)
    return RMSNorm(dim, config.norm_eps)


class Linear(eqx.Module):
    """y = x @ weight (+ bias); weight stored (in, out) so no transpose is needed."""

    weight: Float[Array, "d_in d_out"]
    bias: Float[Array, " d_out"] | None

    def __init__(self, d_in: int, d_out: int, std: float, bias: bool, *, key: PRNGKeyArray):
        self.weight = std * jr.normal(key, (d_in, d_out), jnp.float32)
        self.bias = jnp.zeros(d_out, jnp.float32) if bias else None

    def __call__(self, x: Float[Array, "*shape d_in"]) -> Float[Array, "*shape d_out"]:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


def rope_table(positions: Int[Array, " seq"], head_dim: int, base: float):
    """cos and sin, each (seq, head_dim), for the rotate-half convention. Built once per forward."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (seq, head_dim/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (seq, head_dim)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "seq head head_dim"], cos, sin) -> Float[Array, "seq head head_dim"]:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half(x)
    out = x.astype(jnp.float32) * cos[:, None, :] + rotated.astype(jnp.float32) * sin[:, None, :]
    return out.astype(x.dtype)


class KVCache(eqx.Module):
    """Keys and values of the first `length` tokens, so decoding reruns nothing: the prompt goes
    through the blocks once (prefill), then each new token is one query against the cache. Room
    for block_size tokens, the longest context trained on. Positions (RoPE, the mask) count from
    slot 0, so a cache equals a fresh forward over exactly the tokens it holds; `generate` relies
    on that when it restarts a full cache. A leading layer axis, except inside a block."""

    k: Float[Array, "*layer block_size head head_dim"]  # in the compute dtype
    v: Float[Array, "*layer block_size head head_dim"]
    length: Int[Array, ""]  # slots [0, length) are filled; the rest are never attended to
    last_token: Int[Array, ""] | None  # the token in slot length-1, -1 when empty: the bigram's context


def empty_cache(config: GPTConfig) -> KVCache:
    shape = (config.n_layer, config.block_size, config.n_head, config.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(config.compute_dtype))
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32))


def attention_implementation(config: GPTConfig, dtype) -> str:
    if config.attention != "auto":
        return config.attention
    # cuDNN's fused (flash) attention needs an NVIDIA GPU and a 16-bit dtype. On a CPU the
    # explicit head-major form beats jax's XLA one (BENCHMARKS.md "CPU step").
    if jax.default_backend() == "cpu":
        return "explicit"
    return "cudnn" if dtype in (jnp.bfloat16, jnp.float16) else "xla"


class Attention(eqx.Module):
    qkv: Linear  # fused q, k, v; train.split_qkv finds it by this name, gpt2.TENSORS too
    proj: Linear
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    value_lambdas: Float[Array, "2"] | None  # value embeddings: v is lambdas[0] v + lambdas[1] ve
    config: GPTConfig = eqx.field(static=True)

    def __init__(self, config: GPTConfig, *, key: PRNGKeyArray):
        k_qkv, k_proj = jr.split(key)
        d = config.n_embd
        self.qkv = Linear(d, 3 * d, 0.02, config.bias, key=k_qkv)
        # GPT-2: residual output projections scaled by 1/sqrt(2 * n_layer) (two per block)
        self.proj = Linear(d, d, 0.02 / math.sqrt(2 * config.n_layer), config.bias, key=k_proj)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.value_lambdas = jnp.array([0.5, 0.5]) if config.value_embeds else None  # the speedrun's
        self.config = config

    def __call__(
        self, x: Float[Array, "seq d"], cos, sin, cache: KVCache | None = None, *,
        value_embed: Float[Array, "seq d"] | None = None, key=None,
    ) -> tuple[Float[Array, "seq d"], KVCache | None]:
        """Causal self-attention over x; given one layer's cache, over the cached tokens and then x.
        Returns the output and the cache with x's keys and values written in (None without one).
        cos is None: no RoPE (learned positions). value_embed: x's tokens' rows of this layer's
        value table (with config.value_embeds)."""
        seq, n_head, head_dim = x.shape[0], self.config.n_head, self.config.head_dim
        q, k, v = (t.reshape(seq, n_head, head_dim) for t in jnp.split(self.qkv(x), 3, axis=-1))
        if self.value_lambdas is not None:  # each token's own vector into its value, learned mix
            v = self.value_lambdas[0] * v + self.value_lambdas[1] * value_embed.reshape(v.shape)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        impl = attention_implementation(self.config, x.dtype)
        rate = self.config.attn_dropout if key is not None else 0.0
        start = 0 if cache is None else cache.length
        queries = start + jnp.arange(seq)  # the positions of x's tokens
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, k, cache.length, axis=0)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, v, cache.length, axis=0)
            # Slot i holds position i: the rule also hides the stale or empty slots after x's.
            mask = causal_mask(queries, jnp.arange(k.shape[0]))
            # The XLA path: cuDNN's fused kernel is for causal training shapes, not a masked cache.
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
            cache = KVCache(k, v, cache.length + seq, None)
        elif impl == "explicit" or rate > 0:  # jax's fused kernels take no dropout
            y = explicit_attention(q, k, v, causal_mask(queries, queries), rate, key)
        else:  # causal_mask(queries, queries) as the flag the fused kernels take (cuDNN then skips
            # the masked tiles); softmax statistics are float32 inside both implementations
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        return self.proj(y.reshape(x.shape)), cache


def causal_mask(queries: Int[Array, " q"], keys: Int[Array, " k"]) -> Array:
    """The causal rule, (q, k) booleans: a query at position p sees the keys at positions <= p.
    Every attention path takes it from here (the fused kernels as their is_causal flag)."""
    return queries[:, None] >= keys[None, :]


def explicit_attention(q, k, v, mask, rate: float = 0.0, key: PRNGKeyArray | None = None):
    """softmax(q k^T / sqrt(head_dim)) v written out where mask is True, heads leading so both
    products are plain batched matmuls, with nanoGPT's dropout on the probabilities when training
    (rate > 0). It holds the (head, seq, seq) scores in memory: fine at block 256, costly at 1024,
    where a GPU runs cuDNN's flash kernel instead."""
    head_dim = q.shape[-1]
    q, k, v = (jnp.swapaxes(t, 0, 1) for t in (q, k, v))  # (head, seq, head_dim)
    scores = jnp.matmul(q, jnp.swapaxes(k, 1, 2), preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores / math.sqrt(head_dim), -jnp.inf)
    probs = dropout(jax.nn.softmax(scores, axis=-1), rate, key).astype(v.dtype)
    return jnp.swapaxes(probs @ v, 0, 1)  # (seq, head, head_dim)


def relu_squared(x: Array) -> Array:
    """relu(x)**2 (So et al. 2021, "Primer"), the speedrun's MLP activation."""
    return jnp.square(jax.nn.relu(x))


class MLP(eqx.Module):
    fc: Linear
    proj: Linear
    activation: str = eqx.field(static=True)

    def __init__(self, config: GPTConfig, *, key: PRNGKeyArray):
        k_fc, k_proj = jr.split(key)
        d = config.n_embd
        self.fc = Linear(d, 4 * d, 0.02, config.bias, key=k_fc)
        self.proj = Linear(4 * d, d, 0.02 / math.sqrt(2 * config.n_layer), config.bias, key=k_proj)
        self.activation = config.mlp_activation

    def __call__(self, x: Float[Array, "seq d"]) -> Float[Array, "seq d"]:
        if self.activation == "relu2":
            return self.proj(relu_squared(self.fc(x)))
        # Checkpointed: the backward keeps only the GELU's input, not the ~5 MLP-wide intermediates
        # of its tanh formula: a faster CPU step (BENCHMARKS.md, "Training on CPU").
        return self.proj(jax.checkpoint(jax.nn.gelu)(self.fc(x)))


class Block(eqx.Module):
    attn_norm: RMSNorm | LayerNorm
    attn: Attention
    mlp_norm: RMSNorm | LayerNorm
    mlp: MLP
    dropout: float = eqx.field(static=True)

    def __init__(self, config: GPTConfig, *, key: PRNGKeyArray):
        k_attn, k_mlp = jr.split(key)
        self.attn_norm = make_norm(config, config.n_embd)
        self.attn = Attention(config, key=k_attn)
        self.mlp_norm = make_norm(config, config.n_embd)
        self.mlp = MLP(config, key=k_mlp)
        self.dropout = config.dropout

    def __call__(
        self, x: Float[Array, "seq d"], cos, sin, cache: KVCache | None = None, *,
        value_embed: Array | None = None, key=None,
    ) -> tuple[Float[Array, "seq d"], KVCache | None]:
        """Pre-norm attention then MLP, each added to the residual stream; the cache (this
        layer's, or None) goes through the attention. value_embed: for the attention."""
        k_probs, k_attn, k_mlp = split_key(key, 3)
        y, cache = self.attn(self.attn_norm(x), cos, sin, cache, value_embed=value_embed, key=k_probs)
        x = x + dropout(y, self.dropout, k_attn)
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout, k_mlp)
        return x, cache


# ---- The embedding lookup and the loss, each with a hand-written backward pass


@jax.custom_vjp
def embed(table: Float[Array, "vocab d"], tokens: Int[Array, "*shape"]) -> Float[Array, "*shape d"]:
    """table[tokens], whose gradient sums the rows of each token id, as each platform does best.

    Autodiff turns a lookup into a scatter-add, whose atomics on a GPU collide on the frequent ids
    of real text (space, "e", "the") and add in a different order every run; there the gradient is
    a sorted running sum with none: faster at GPT-2 124M and bit-for-bit repeatable (BENCHMARKS.md,
    "GPU"). A CPU adds rows one after another, in order: its scatter-add is deterministic and ~10x
    quicker than the sort (BENCHMARKS.md, "The lookups' backward on a CPU"). Call it on the whole
    batch, outside vmap: under vmap the backward would build one (vocab, d) gradient per sequence.
    """
    return table[tokens]


def _embed_fwd(table, tokens):
    return table[tokens], (table, tokens)  # the table itself: only for its shape, never copied


def _embed_bwd(residuals, grad):
    table, tokens = residuals
    summed = jax.lax.platform_dependent(  # the branch is chosen when the step is compiled
        tokens, grad, cpu=functools.partial(scatter_rows_by_id, num_ids=table.shape[0]),
        default=functools.partial(sum_rows_by_id, num_ids=table.shape[0]))
    return summed.astype(table.dtype), None


embed.defvjp(_embed_fwd, _embed_bwd)


def sum_rows_by_id(ids: Int[Array, "*shape"], rows: Float[Array, "*shape d"], num_ids: int):
    """out[i] = the sum of rows[j] over every j with ids[j] == i, in float32, deterministically.

    Sorts the rows by id, takes their running sum, and reads each id's total as the difference of
    the running sum across its run of rows: a sort, a cumsum and two gathers, in a fixed order.
    """
    ids = ids.reshape(-1)
    rows = rows.reshape(ids.shape[0], -1).astype(jnp.float32)
    order = jnp.argsort(ids)  # stable: equal ids keep their order, so the sum's order is fixed
    running = jnp.cumsum(rows[order], axis=0)
    running = jnp.concatenate([jnp.zeros_like(running[:1]), running])  # running[j]: first j rows
    bounds = jnp.searchsorted(ids[order], jnp.arange(num_ids + 1))  # where each id's run starts
    return running[bounds[1:]] - running[bounds[:-1]]


def scatter_rows_by_id(ids: Int[Array, "*shape"], rows: Float[Array, "*shape d"], num_ids: int):
    """sum_rows_by_id as a scatter-add (a CPU's: one pass over the rows, in order)."""
    ids = ids.reshape(-1)
    rows = rows.reshape(ids.shape[0], -1).astype(jnp.float32)
    return jax.ops.segment_sum(rows, ids, num_segments=num_ids)


@jax.custom_vjp
def cross_entropies(logits: Float[Array, "*shape vocab"], targets: Int[Array, "*shape k"]):
    """-log softmax(logits)[target] for each of k targets a position, in float32, from logits in
    the compute dtype: one softmax scores them all (multi_token_loss; k=1 is cross_entropy).

    The float32 upcast happens inside the fused reductions (forward) and the one elementwise pass
    of the backward, softmax - one_hot, which writes its gradient in the logits' dtype: no float32
    copy of the (tokens, vocab) logits is ever stored, and the head's matmuls run in bf16
    (BENCHMARKS.md, "The training step, GPT-2 124M").
    """
    return _cross_entropies_fwd(logits, targets)[0]


def _cross_entropies_fwd(logits, targets):
    logits32 = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits32, axis=-1)
    target_logits = jnp.take_along_axis(logits32, targets, axis=-1)
    return log_normalizer[..., None] - target_logits, (logits, targets, log_normalizer)


def _cross_entropies_bwd(residuals, grad):
    logits, targets, log_normalizer = residuals
    probs = jnp.exp(logits.astype(jnp.float32) - log_normalizer[..., None])
    one_hots = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)  # (*shape, k, vocab)
    # each target's (softmax - one_hot), weighted by its loss's gradient: a sum of one when k=1
    per_target = (probs[..., None, :] - one_hots) * grad[..., None]
    return jnp.sum(per_target, axis=-2).astype(logits.dtype), None


cross_entropies.defvjp(_cross_entropies_fwd, _cross_entropies_bwd)


def cross_entropy(logits: Float[Array, "*shape vocab"], targets: Int[Array, "*shape"]):
    """-log softmax(logits)[target] per token, in float32 (cross_entropies of one target)."""
    return cross_entropies(logits, targets[..., None])[..., 0]


def cast_floats(tree, dtype):
    """Casts every floating-point array in a pytree (the model's one cast to compute dtype)."""
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


# Marks a GPT field that is a lookup table: read by index, never multiplied, so num_params leaves
# it out of the non-embedding count.
LOOKUP = {"lookup": True}


class GPT(eqx.Module):
    embed: Float[Array, "vocab d"] = eqx.field(metadata=LOOKUP)
    pos_embed: Float[Array, "block d"] | None = eqx.field(metadata=LOOKUP)  # None with RoPE
    # row (previous + 1) * vocab + token: the token after the one before it (-1: none before it)
    bigram_embed: Float[Array, "pairs d"] | None = eqx.field(metadata=LOOKUP)
    # value embeddings: block i reads table i % tables, so block i and block i + n_layer/2 share
    value_embeds: Float[Array, "table vocab d"] | None = eqx.field(metadata=LOOKUP)
    blocks: Block  # stacked: a leading n_layer axis; in_block_stack (below) knows this name
    final_norm: RMSNorm | LayerNorm
    lm_head: Float[Array, "d vocab"] | None  # None when tied to embed
    config: GPTConfig = eqx.field(static=True)

    def __init__(self, config: GPTConfig, *, key: PRNGKeyArray):
        if config.vocab_size < 1:  # 0 is "the data's": train.py resolves it from meta.json
            raise ValueError("vocab_size=0 (the data's) must be resolved before the model is made")
        k_embed, k_blocks, k_head = jr.split(key, 3)
        # folded in, not a wider split: a model without these switches keeps its old init
        k_pos, k_values = jr.fold_in(k_embed, 1), jr.fold_in(k_embed, 2)
        vocab, d = config.vocab_size, config.n_embd
        self.embed = 0.02 * jr.normal(k_embed, (vocab, d), jnp.float32)
        self.pos_embed = None
        if config.position_embedding == "learned":
            self.pos_embed = 0.02 * jr.normal(k_pos, (config.block_size, d), jnp.float32)
        # The speedrun's bigram table starts at zero: the model learns what the pairs add.
        self.bigram_embed = None
        if config.bigram_embed:
            self.bigram_embed = jnp.zeros(((vocab + 1) * vocab, d), jnp.float32)
        self.value_embeds = None
        if config.value_embeds:  # the speedrun's pattern 012...012: the two halves share tables
            shape = ((config.n_layer + 1) // 2, vocab, d)
            self.value_embeds = 0.02 * jr.normal(k_values, shape, jnp.float32)
        make_block = lambda k: Block(config, key=k)  # noqa: E731
        self.blocks = eqx.filter_vmap(make_block)(jr.split(k_blocks, config.n_layer))
        self.final_norm = make_norm(config, d)
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = 0.02 * jr.normal(k_head, (d, vocab), jnp.float32)
        self.config = config

    def __call__(
        self, tokens: Int[Array, " seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq vocab"]:
        """Float32 next-token logits for one sequence. key=None: inference (no dropout)."""
        hidden, _ = forward(self, tokens[None], key=key)
        return self.logits(hidden[0]).astype(jnp.float32)

    def run_blocks(
        self, x: Float[Array, "seq d"], value_embeds: Float[Array, "layer seq d"] | None = None,
        cache: KVCache | None = None, *, key=None,
    ) -> tuple[Float[Array, "seq d"], KVCache | None]:
        """The blocks of `forward` for one sequence: adds positions to embedded tokens x, runs the
        stack and final-norms. value_embeds: each block's rows of its value table (with
        config.value_embeds). Given a cache, x continues the tokens it holds (positions start at
        cache.length) and it comes back with x's keys and values added."""
        config = self.config
        model = cast_floats(self, jnp.dtype(config.compute_dtype))
        start = 0 if cache is None else cache.length
        k_embed, k_blocks = split_key(key, 2)
        x = x.astype(jnp.dtype(config.compute_dtype))
        if model.pos_embed is not None:
            # A slice, not a lookup: its gradient is a sum over the batch, not a scatter-add.
            x = x + jax.lax.dynamic_slice_in_dim(model.pos_embed, start, x.shape[0])
        x = dropout(x, config.dropout, k_embed)
        cos, sin = None, None
        if config.position_embedding == "rope":
            cos, sin = rope_table(start + jnp.arange(x.shape[0]), config.head_dim, config.rope_base)
        if value_embeds is not None:
            value_embeds = value_embeds.astype(x.dtype)

        block_params, block_static = eqx.partition(model.blocks, eqx.is_array)
        layer_keys = None if k_blocks is None else jr.split(k_blocks, config.n_layer)
        layer_kv = None if cache is None else (cache.k, cache.v)  # scanned with the parameters

        def run_block(x, layer):  # one block, with its slices of the parameters, keys, cache
            params, layer_key, kv, value_embed = layer  # and value rows
            cache_in = None if kv is None else KVCache(*kv, start, None)
            x, cache_out = eqx.combine(params, block_static)(
                x, cos, sin, cache_in, value_embed=value_embed, key=layer_key)
            return x, None if cache_out is None else (cache_out.k, cache_out.v)

        if config.remat:
            run_block = jax.checkpoint(run_block)
        # Unrolled, XLA fuses across blocks and drops the scan's per-layer copies: faster on a GPU
        # (BENCHMARKS.md, "The training step, GPT-2 124M"); still traced once per block.
        layers = (block_params, layer_keys, layer_kv, value_embeds)
        x, layer_kv = jax.lax.scan(run_block, x, layers, unroll=config.unroll_layers)
        if cache is not None:
            cache = KVCache(*layer_kv, cache.length + x.shape[0], cache.last_token)
        return model.final_norm(x), cache

    def logits(self, x: Float[Array, "*seq d"]) -> Float[Array, "*seq vocab"]:
        """Next-token logits in x's dtype (the compute dtype): cross_entropy reads them in float32
        where it matters, and a bf16 head runs its matmuls at bf16 speed (3x TF32's)."""
        head = self.embed.T if self.lm_head is None else self.lm_head
        return x @ head.astype(x.dtype)


def forward(
    model: GPT, tokens: Int[Array, "batch seq"], cache: KVCache | None = None, *, key=None
) -> tuple[Float[Array, "batch seq d"], KVCache | None]:
    """The forward pass, the one that training's loss, evaluation, decoding and the benchmarks all
    run: token ids -> final-normed hidden states in the compute dtype (model.logits(hidden) gives
    the logits), and the cache with the tokens' keys and values added (None without one).

    key: dropout (training). cache: one KVCache per sequence (a leading batch axis on k and v, one
    length for all); the tokens continue the ones it holds.
    """
    # The lookups over the whole batch: one sorted sum for each table in the backward.
    x = embed(model.embed, tokens)
    if model.bigram_embed is not None:  # each token paired with the one before it (-1: none)
        before = jnp.full(tokens.shape[:1], -1) if cache is None else cache.last_token
        before = jnp.concatenate([before[:, None], tokens[:, :-1]], axis=1)
        x = x + embed(model.bigram_embed, (before + 1) * model.config.vocab_size + tokens)
    value_embeds = None
    if model.value_embeds is not None:  # (batch, layer, seq, d): block i reads its table's rows
        tables, vocab, d = model.value_embeds.shape
        table_of_block = jnp.arange(model.config.n_layer) % tables
        ids = tokens[:, None, :] + vocab * table_of_block[None, :, None]
        value_embeds = embed(model.value_embeds.reshape(tables * vocab, d), ids)
    keys = None if key is None else jr.split(key, tokens.shape[0])
    # The vmapped axes of a cache: all but its length, which is one for all.
    cache_axes = None if cache is None else KVCache(0, 0, None, 0)

    def one(x, value_embeds, cache, key):
        return model.run_blocks(x, value_embeds, cache, key=key)

    hidden, cache = jax.vmap(
        one, in_axes=(0, None if value_embeds is None else 0, cache_axes, None if key is None else 0),
        out_axes=(0, cache_axes))(x, value_embeds, cache, keys)
    if cache is not None:
        cache = KVCache(cache.k, cache.v, cache.length, tokens[:, -1])
    return hidden, cache


def token_losses(
    model: GPT, tokens: Int[Array, "batch seq"], targets: Int[Array, "batch seq"], *,
    vocab_limit: int | None = None, key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, "batch seq"], Array]:
    """(each target's cross entropy in float32, 0 where it is not counted; which are counted).

    A negative target (data.IGNORE, as nanoGPT's ignore_index=-1) is a position no loss counts,
    such as the question of an addition problem; on text, where every target counts, the mask
    costs three elementwise passes over (batch, seq), nothing over the vocabulary. vocab_limit:
    ids >= it (the padding of a rounded-up vocab_size) are left out of the softmax (evaluation).
    """
    hidden, _ = forward(model, tokens, key=key)
    logits = model.logits(hidden)
    if vocab_limit is not None:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    counted = targets >= 0
    losses = cross_entropy(logits, jnp.where(counted, targets, 0))
    return jnp.where(counted, losses, 0.0), counted


def loss_fn(
    model: GPT,
    tokens: Int[Array, "batch seq"],
    targets: Int[Array, "batch seq"],
    *,
    key: PRNGKeyArray | None = None,
) -> Float[Array, ""]:
    """Training's loss: the mean next-token cross entropy over a batch's counted targets."""
    losses, counted = token_losses(model, tokens, targets, key=key)
    return jnp.sum(losses) / jnp.maximum(jnp.sum(counted), 1)


def multi_token_loss(
    model: GPT,
    tokens: Int[Array, "batch seq"],
    targets: Int[Array, "batch seq"],
    ahead_weights: Float[Array, " k"],
    *,
    key: PRNGKeyArray | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(training's objective, the next-token loss) with multi-token prediction (Gloeckle et al.
    2024; the speedrun's record 53): the logits at each position also score the targets 2, 3, ...
    tokens ahead from the same softmax, the i-th further one weighted by ahead_weights[i], so the
    step does no product more. Each loss is a mean over the counted next-token targets; a target
    past the window's end, or negative, is not counted."""
    hidden, _ = forward(model, tokens, key=key)
    logits = model.logits(hidden)
    seq, ahead = targets.shape[1], ahead_weights.shape[0]
    later = jnp.pad(targets, ((0, 0), (0, ahead)), constant_values=-1)
    stacked = jnp.stack([later[:, i:i + seq] for i in range(ahead + 1)], axis=-1)  # (b, s, 1+k)
    counted = stacked >= 0
    losses = jnp.where(counted, cross_entropies(logits, jnp.where(counted, stacked, 0)), 0.0)
    num_counted = jnp.maximum(jnp.sum(counted[..., 0]), 1)
    next_token = jnp.sum(losses[..., 0]) / num_counted
    return next_token + jnp.sum(losses[..., 1:] * ahead_weights) / num_counted, next_token


def extend(
    model: GPT, tokens: Int[Array, " seq"], cache: KVCache
) -> tuple[Float[Array, "seq vocab"], KVCache]:
    """Runs `tokens` as the continuation of the cached ones: their float32 logits and the cache
    with their keys and values appended. Prefill is extend(model, prompt, empty_cache(config));
    a decode step is extend(model, token[None], cache). The caller keeps
    cache.length + seq <= block_size (a full cache would silently overwrite its last slots)."""
    model = cast_floats(model, jnp.dtype(model.config.compute_dtype))  # a no-op if already cast
    batch_of_one = KVCache(cache.k[None], cache.v[None], cache.length, cache.last_token[None])
    hidden, cache = forward(model, tokens[None], batch_of_one)
    one = KVCache(cache.k[0], cache.v[0], cache.length, cache.last_token[0])
    return model.logits(hidden[0]).astype(jnp.float32), one


# ---- Facts derived from the model itself: its parameter count, its FLOPs, its stacked arrays


def num_params(model: GPT, non_embedding: bool = False) -> int:
    """Parameter count (works on abstract models from eqx.filter_eval_shape too); non_embedding
    leaves out the lookup tables (the fields marked LOOKUP), as nanoGPT counts."""
    is_param = lambda x: isinstance(x, (jax.Array, jax.ShapeDtypeStruct))  # noqa: E731
    count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree) if is_param(a))  # noqa: E731
    total = count(model)
    if non_embedding:
        total -= sum(count(getattr(model, f.name)) for f in dataclasses.fields(model)
                     if f.metadata.get("lookup"))
    return total


@functools.lru_cache(maxsize=16)  # the loop asks at every log line
def flops_per_token(config: GPTConfig) -> int:
    """Training FLOPs per token: 3x the forward's matrix multiplications (the backward does two
    for each), counted in the jaxpr of `forward` and the head over one block_size sequence with
    the written-out attention. For the standard blocks that is 6N + 12·L·d·T (PaLM, appendix B;
    N the non-embedding parameters plus the head, tested); it follows any change to the model:
    a new matmul is counted, a lookup or an elementwise op is not."""
    config = dataclasses.replace(config, attention="explicit")  # causal attention as two matmuls
    abstract = eqx.filter_eval_shape(GPT, config, key=jr.key(0))
    tokens = jax.ShapeDtypeStruct((1, config.block_size), jnp.int32)
    jaxpr = eqx.filter_make_jaxpr(lambda m, t: m.logits(forward(m, t)[0]))(abstract, tokens)[0]
    return 3 * matmul_flops(jaxpr.jaxpr) // config.block_size


def matmul_flops(jaxpr) -> int:
    """2 x the multiply-adds of every dot_general in a jaxpr, into the jaxprs inside its equations
    (a scan's body counts `length` times)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[a] for a in contracted)
        repeats = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for inner in jax.extend.core.jaxprs_in_params(eqn.params):
            total += repeats * matmul_flops(inner)
    return total


def names_on(path) -> set:
    """The attribute names (and dict keys) along a pytree path."""
    return {getattr(key, "name", getattr(key, "key", None)) for key in path}


def in_block_stack(path) -> bool:
    """Arrays under .blocks carry a leading n_layer axis (blocks are stacked and scanned): the
    FSDP rule never splits that axis, and the optimizer treats it as a batch of matrices."""
    return "blocks" in names_on(path)


def with_config(model: GPT, config: GPTConfig) -> GPT:
    """The same parameters under a new config of the same shapes, e.g. another compute_dtype.

    The config is a static field (in Attention too), so eqx.tree_at cannot change it: build an
    abstract GPT of the new config and put the arrays into it.
    """
    abstract = eqx.filter_eval_shape(GPT, config, key=jr.key(0))
    new_leaves, treedef = jax.tree.flatten(abstract)
    leaves = jax.tree.leaves(model)
    if [a.shape for a in new_leaves] != [a.shape for a in leaves]:
        raise ValueError("with_config: the new config changes parameter shapes")
    return jax.tree.unflatten(treedef, leaves)
