# A 1.3B-class GPT (GPT-2 XL shapes, 48 layers, d=1600) on OpenWebText, sharded with FSDP:
# parameters and optimizer state are split over all devices, blocks recomputed in the backward.
# Prepare: python prepare_openwebtext.py
# Result: not measured yet.
from config import TrainConfig
from model import GPTConfig

config = TrainConfig(
    data_dir="data/openwebtext",
    model=GPTConfig(
        block_size=1024, vocab_size=50304, n_layer=48, n_head=25, n_embd=1600,
        remat=True,  # activations of 48 layers do not fit otherwise; ~1/3 more compute
    ),
    batch_size=32,
    grad_accum=16,  # 524,288 tokens per step
    learning_rate=2e-4,  # bigger models want smaller steps (GPT-3 table 2.1)
    min_lr=2e-5,
    warmup_steps=2000,
    max_steps=300000,
    weight_decay=0.1,
    beta2=0.95,
    fsdp=-1,  # shard over every device
    eval_interval=1000,
    eval_iters=100,
)
