# GPT-2 small (124M) on OpenWebText, the nanoGPT reproduction: ~0.5M tokens per step.
# Prepare: python prepare_openwebtext.py   (about 9B tokens; needs the `datasets` package)
# Result: not measured yet (nanoGPT's reference reaches val ~2.85 after 600k steps on 8 A100s).
from config import TrainConfig
from model import GPTConfig

config = TrainConfig(
    data_dir="data/openwebtext",
    model=GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768),
    batch_size=32,  # sequences per micro-batch over all devices
    grad_accum=16,  # 16 * 32 * 1024 = 524,288 tokens per step, GPT-2's ~0.5M
    learning_rate=6e-4,
    min_lr=6e-5,
    warmup_steps=2000,
    max_steps=600000,
    weight_decay=0.1,
    beta2=0.95,
    eval_interval=1000,
    eval_iters=100,
    log_interval=10,
)
