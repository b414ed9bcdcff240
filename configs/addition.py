# 2-digit addition, as minGPT's adder: a GPT learns a+b from the digits alone, on a CPU in minutes.
# Prepare: python prepare_addition.py       (3 digits: --digits 3 --out_dir data/addition3, then
#          train with --data_dir=data/addition3 --model.block_size=9)
# Result: exact match 100.00% of the 1,000 val problems at step 3000, 1:21 wall on a 2-core
# x86_64 VM (2026-11-23); 3 digits, --max_steps=6000: 99.98% of 10,000, 4:32 wall (README).
from config import TrainConfig
from model import GPTConfig

config = TrainConfig(
    data_dir="data/addition",
    model=GPTConfig(
        block_size=6,  # a problem is 3n+1 = 7 tokens: 6 inputs, 6 targets of which 3 count
        n_layer=3, n_head=4, n_embd=128, dropout=0.0,
        compute_dtype="float32",  # CPUs have no fast bf16 matmul
        unroll_layers=False,
    ),
    batch_size=64,
    learning_rate=1e-3,
    min_lr=1e-4,
    warmup_steps=100,
    max_steps=3000,
    beta2=0.99,
    eval_interval=500,
    eval_iters=20,
    log_interval=100,
)
