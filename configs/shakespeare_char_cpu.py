# A laptop-sized character model on Tiny Shakespeare: trains on a CPU in minutes.
# Prepare: python prepare_shakespeare.py
# Result: see README.md's quick start and BENCHMARKS.md "Faster to a loss on CPU" (val loss at
# 2000 steps and the time to nanoGPT's final loss, against nanoGPT's train.py on the same CPU).
from config import TrainConfig
from model import GPTConfig

config = TrainConfig(
    data_dir="data/shakespeare_char",
    model=GPTConfig(
        # 3 layers at batch 16 (nanoGPT's shape is 4 at batch 12): the same block matmuls a step, a
        # 5% slower step, lower val at step 350 on two corpora and three seeds and at 2000 on the
        # mean of each corpus's three, higher on seed 1338 (BENCHMARKS.md round 7); 2 layers get to
        # nanoGPT's loss sooner but end higher (round 5)
        block_size=64, n_layer=3, n_head=4, n_embd=128, dropout=0.0,
        mlp_activation="relu2",  # lower val than GELU on two corpora, and a cheaper step (BENCHMARKS.md)
        compute_dtype="float32",  # CPUs have no fast bf16 matmul: float32 is quicker here
        remat=True,  # on XLA:CPU recomputing a block beats storing its activations (BENCHMARKS.md)
        unroll_layers=False,  # unrolled, the CPU step took ~25% longer (GPUs gain: BENCHMARKS.md)
        # the speedrun's value embeddings and a bigram table: each lowered val at step 2000 on two
        # corpora and two seeds (BENCHMARKS.md "The recipe's third round")
        value_embeds=True,
        bigram_embed=True,
    ),
    batch_size=16,
    # Muon on the blocks' matrices: orthogonalised updates move every direction of a matrix, and
    # reach a lower val than AdamW on two corpora and two seeds (BENCHMARKS.md "Muon")
    optimizer="muon",
    muon_learning_rate=0.01,  # the best peak of the ones measured (BENCHMARKS.md "Muon")
    muon_momentum=0.9,  # a shorter memory suits ~1,000 tokens a step: lower val (BENCHMARKS.md)
    normuon=True,  # NorMuon: lower val on both corpora and seeds (BENCHMARKS.md "third round")
    muon_preconditioning="aol",  # AOL's first step: 4 iterations do the work of 5 (optax)
    muon_ns_steps=4,
    learning_rate=1e-3,  # AdamW's, for the embedding and the norm gains
    min_lr=1e-4,
    # a short warmup: Muon's steps are bounded by construction, and the early steps are the ones
    # that race to nanoGPT's loss (BENCHMARKS.md "Faster to a loss on CPU")
    warmup_steps=20,
    max_steps=2000,
    beta2=0.99,  # few tokens per step: a longer second-moment memory smooths the noise
    eval_interval=250,
    eval_iters=20,
    log_interval=50,
)
