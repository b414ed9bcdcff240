# Baby GPT on Tiny Shakespeare, characters: the nanoGPT quick start, for one GPU (~minutes).
# Prepare: python prepare_shakespeare.py
# Result: one H100, 2026-11-23, seed 1337, stopped at step 4000 (not yet run to 5000): best
# val 1.431 at step 2750, 1.446 at 4000; nanoGPT's own config: best 1.466 (BENCHMARKS.md).
from config import TrainConfig
from model import GPTConfig

config = TrainConfig(
    data_dir="data/shakespeare_char",
    model=GPTConfig(
        block_size=256, n_layer=6, n_head=6, n_embd=384,
        dropout=0.3,  # with nanoGPT's 0.2 this model memorises Shakespeare from step ~1000
        attn_dropout=0.3,  # with weight_decay=2.0: val holds to step 4000; an unfused, slower step
    ),
    batch_size=64,
    learning_rate=1e-3,  # a baby network can take a big step
    min_lr=1e-4,  # learning_rate / 10, as Chinchilla
    warmup_steps=100,
    max_steps=5000,
    beta2=0.99,  # few tokens per step: a longer second-moment memory smooths the noise
    weight_decay=2.0,  # strong: with less the baby GPT overfits by step 5000 (BENCHMARKS.md)
    eval_interval=250,
    eval_iters=200,
    log_interval=10,
)
