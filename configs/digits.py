# Images as tokens, as minGPT's image GPT: the 8x8 handwritten digits that scikit-learn ships,
# 64 pixel tokens after a class-label token. Trains on a CPU in minutes.
# Prepare: python prepare_digits.py       Look: python sample.py --rundir=RUN (writes a PNG)
# Result: val loss 1.122 at step 1500, 4:09 wall on a 2-core x86_64 VM shared with other work
# (2026-11-23); its samples are docs/digits_samples.png (README).
from config import TrainConfig
from model import GPTConfig

config = TrainConfig(
    data_dir="data/digits",
    model=GPTConfig(
        block_size=64,  # an image is 65 tokens: the label, then 64 pixels
        n_layer=4, n_head=4, n_embd=128,
        dropout=0.1,  # 1,617 training images: a few hundred steps see each many times
        compute_dtype="float32",  # CPUs have no fast bf16 matmul
        unroll_layers=False,
    ),
    batch_size=16,
    learning_rate=1e-3,
    min_lr=1e-4,
    warmup_steps=100,
    max_steps=1500,
    beta2=0.99,
    eval_interval=250,
    eval_iters=20,
    log_interval=50,
)
