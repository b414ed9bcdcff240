# Baby GPT on Tiny Shakespeare, characters: the nanoGPT quick start, for one GPU (~minutes).
# Prepare: python prepare_shakespeare.py
# Result: not measured yet on a GPU (nanoGPT's reference gets val ~1.47 at 5000 steps).
from model import GPTConfig
from train import TrainConfig

config = TrainConfig(
    data_dir="data/shakespeare_char",
    model=GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    batch_size=64,
    learning_rate=1e-3,  # a baby network can take a big step
    min_lr=1e-4,  # learning_rate / 10, as Chinchilla
    warmup_steps=100,
    max_steps=5000,
    beta2=0.99,  # few tokens per step: a longer second-moment memory smooths the noise
    weight_decay=0.1,
    eval_interval=250,
    eval_iters=200,
    log_interval=10,
)
