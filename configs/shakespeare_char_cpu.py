# A laptop-sized character model on Tiny Shakespeare: trains on a CPU in minutes.
# Prepare: python prepare_shakespeare.py
# Result: see README.md's quick start and BENCHMARKS.md "Faster to a loss on CPU" (val loss at
# 2000 steps and the time to nanoGPT's final loss, against nanoGPT's train.py on the same CPU).
from model import GPTConfig
from train import TrainConfig

config = TrainConfig(
    data_dir="data/shakespeare_char",
    model=GPTConfig(
        block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
        mlp_activation="relu2",  # -0.09 val with AdamW on two corpora, and a cheaper step
        compute_dtype="float32",  # CPUs have no fast bf16 matmul: float32 is quicker here
        remat=True,  # on XLA:CPU recomputing a block beats storing its activations (BENCHMARKS.md)
        unroll_layers=False,  # unrolled, the CPU step took ~25% longer (GPUs gain: BENCHMARKS.md)
    ),
    batch_size=12,
    # Muon on the blocks' matrices: val -0.14 against AdamW at 2000 steps on Tiny Shakespeare
    # and on Python source, two seeds each; peak 0.01 beat 0.02 and 0.04 (BENCHMARKS.md)
    optimizer="muon",
    muon_learning_rate=0.01,
    muon_momentum=0.9,  # not 0.95: lower val at step 400 on both corpora and seeds, -0.005 at 2000
    learning_rate=1e-3,  # AdamW's, for the embedding and the norm gains
    min_lr=1e-4,
    # 20 steps of warmup, not nanoGPT's 100: lower val at steps 250-500 on both corpora and both
    # seeds, the same at 2000 (BENCHMARKS.md "Faster to a loss on CPU")
    warmup_steps=20,
    max_steps=2000,
    beta2=0.99,  # few tokens per step: a longer second-moment memory smooths the noise
    eval_interval=250,
    eval_iters=20,
    log_interval=50,
)
