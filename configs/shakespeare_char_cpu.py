# A laptop-sized character model on Tiny Shakespeare: trains on a CPU in minutes.
# Prepare: python prepare_shakespeare.py
# Result: val loss 1.765 at 2000 steps, 49 ms/step, 1:48 wall on a 2-core x86_64 VM
# (nanoGPT in PyTorch, same shapes and schedule: 1.895, 41 ms/step; see BENCHMARKS.md).
from model import GPTConfig
from train import TrainConfig

config = TrainConfig(
    data_dir="data/shakespeare_char",
    model=GPTConfig(
        block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
        compute_dtype="float32",  # CPUs have no fast bf16 matmul: float32 is quicker here
        remat=True,  # on XLA:CPU recomputing a block beats storing its activations (BENCHMARKS.md)
        unroll_layers=False,  # unrolled, the CPU step took ~25% longer (GPUs gain: BENCHMARKS.md)
    ),
    batch_size=12,
    learning_rate=1e-3,
    min_lr=1e-4,
    warmup_steps=100,
    max_steps=2000,
    beta2=0.99,  # few tokens per step: a longer second-moment memory smooths the noise
    eval_interval=250,
    eval_iters=20,
    log_interval=50,
)
