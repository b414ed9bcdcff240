# GPT-2 XL fine-tuned on Tiny Shakespeare in GPT-2's BPE: nanoGPT's finetune_shakespeare.
# Prepare: python prepare_shakespeare.py --tokenizer gpt2
# The weights come from the Hugging Face hub (or a local directory: --init_from=PATH). The
# model's shapes and architecture come from them; the settings below are the rest.
# Result: not measured yet (needs a GPU; nanoGPT reports val ~1.0 after 20 iterations' best).
from config import TrainConfig
from model import GPTConfig

config = TrainConfig(
    data_dir="data/shakespeare",
    init_from="gpt2-xl",  # 1.5B parameters; gpt2 (124M) for a quick try
    model=GPTConfig(dropout=0.0),  # shapes, positions, norms and biases: from the checkpoint
    batch_size=1,
    grad_accum=32,  # 32 x 1024 = 32,768 tokens per step, as nanoGPT
    learning_rate=3e-5,  # a small, constant step: the model already knows English
    min_lr=3e-5,
    warmup_steps=0,
    max_steps=20,  # Shakespeare has ~300k BPE tokens: 20 steps are two passes
    eval_interval=5,
    eval_iters=40,
    log_interval=1,
)
