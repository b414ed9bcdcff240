"""Sampling from a GPT: top-k, top-p and temperature, and `generate`, the loop over new tokens.

The model and its cached forward (`extend`, `KVCache`) live in model.py; this file decides which
token comes next and keeps the cache within the context the model was trained on.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from model import GPT, cast_floats, empty_cache, extend


def top_k_filter(logits: Float[Array, " vocab"], k: int) -> Float[Array, " vocab"]:
    """-inf below the k-th largest logit (ties with it are kept); k=0 turns it off."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][-1]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: Float[Array, " vocab"], p: float) -> Float[Array, " vocab"]:
    """Nucleus filtering (Holtzman et al. 2019): keeps the smallest set of most likely tokens whose
    probability mass reaches p, and always the most likely one; p=1 turns it off."""
    if p >= 1.0:
        return logits
    probs = jax.nn.softmax(logits.astype(jnp.float32))
    order = jnp.argsort(-probs)
    sorted_probs = probs[order]
    mass_before = jnp.cumsum(sorted_probs) - sorted_probs  # of the more likely tokens
    keep_sorted = (mass_before < p).at[0].set(True)  # a token is needed while p is not reached
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def sample_token(
    logits: Float[Array, " vocab"], key: PRNGKeyArray, temperature: float, top_k: int, top_p: float
) -> Int[Array, ""]:
    """One token id from next-token logits; temperature 0 is greedy (argmax). All in float32."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits).astype(jnp.int32)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return jr.categorical(key, logits).astype(jnp.int32)


def generate(
    model: GPT,
    prompt: Int[Array, " prompt"],
    key: PRNGKeyArray,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    vocab_limit: int | None = None,
    return_logits: bool = False,
):
    """max_new_tokens tokens continuing one prompt (vmap over keys for several samples).

    The prompt is cut to its last block_size tokens and prefilled; then one token per step, in a
    lax.scan. When the cache is full, it is rebuilt by a prefill of the most recent block_size//2
    tokens (positions restart at 0), so the model never sees more context than it was trained
    on. vocab_limit: ids >= it are never sampled (the padding of a rounded-up vocab_size).
    return_logits: also return, for each new token, the float32 logits it was sampled from.
    """
    config = model.config
    block = config.block_size
    keep = max(block // 2, 1)  # tokens kept when a full cache is rebuilt
    model = cast_floats(model, jnp.dtype(config.compute_dtype))  # once, not once per token
    prompt = prompt[-block:].astype(jnp.int32)
    vocab = jnp.arange(config.vocab_size)
    allowed = None if vocab_limit is None else vocab < vocab_limit

    def next_logits(logits):
        return logits[-1] if allowed is None else jnp.where(allowed, logits[-1], -jnp.inf)

    logits, cache = extend(model, prompt, empty_cache(config))
    window = jnp.zeros(block, jnp.int32).at[: prompt.shape[0]].set(prompt)  # tokens in the cache

    def step(carry, step_key):
        logits, cache, window = carry
        token = sample_token(logits, step_key, temperature, top_k, top_p)

        def append(cache, window):
            window = jax.lax.dynamic_update_slice(window, token[None], (cache.length,))
            new_logits, cache = extend(model, token[None], cache)
            return next_logits(new_logits), cache, window

        def rebuild(cache, window):
            recent = jnp.concatenate([window[block - keep + 1 :], token[None]])  # keep tokens
            new_logits, cache = extend(model, recent, empty_cache(config))
            return next_logits(new_logits), cache, jnp.zeros_like(window).at[:keep].set(recent)

        # The cache length depends only on the step, never on the sample, so under vmap this
        # stays a real branch: cheaper than branch-free scans (BENCHMARKS.md, "Sampling on the GPU").
        carry = jax.lax.cond(cache.length < block, append, rebuild, cache, window)
        return carry, (token, logits) if return_logits else token

    carry = (next_logits(logits), cache, window)
    _, out = jax.lax.scan(step, carry, jr.split(key, max_new_tokens))
    return out
