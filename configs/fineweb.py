# GPT-2 small (124M) on FineWeb10B, as llm.c's scripts/run_gpt2_124M.sh trains it: 18,865 steps
# of 524,288 tokens (~10B tokens, the shards' one pass), lr 6e-4 after 700 warmup steps, decayed
# to 0, weight decay 0.1. Read from the shards as llm.c and modded-nanogpt download them.
# Data: README.md, "FineWeb shards" (the val shard and 103 train shards of ~100M tokens each).
# Result: not measured yet.
from config import TrainConfig
from model import GPTConfig

config = TrainConfig(
    data_dir="data/fineweb10B",  # the folder of fineweb_{train,val}_*.bin, or a glob of them
    model=GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768),
    batch_size=32,  # sequences per micro-batch over all devices (as configs/openwebtext.py)
    grad_accum=16,  # 16 * 32 * 1024 = 524,288 tokens per step: llm.c's -d 524288
    learning_rate=6e-4,
    min_lr=0.0,  # llm.c's -q 0.0: the cosine ends at 0
    warmup_steps=700,
    max_steps=18865,  # 18,865 * 524,288 = 9.9B tokens
    weight_decay=0.1,
    beta2=0.95,
    eval_interval=250,  # llm.c's -v 250
    eval_iters=100,  # 100 * 32 * 1024 = 3.3M val tokens an evaluation
    log_interval=10,
)
