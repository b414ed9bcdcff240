"""TrainConfig: every setting of a run, each checked where the config is built.

A config file in configs/ builds one (`config = TrainConfig(...)`), launch.py overrides any field
with --key=value, and the run directory's config.json holds it resolved. The model's own
settings are model.GPTConfig, its `model` field.
"""

import dataclasses
import math

from model import GPTConfig, padded_vocab


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data_dir: str = "data/openwebtext"  # a directory made by a prepare_*.py script
    model: GPTConfig = GPTConfig()
    # batch: each step sees grad_accum * batch_size * block_size tokens
    batch_size: int = 12  # sequences per micro-batch, over all devices and hosts
    grad_accum: int = 1  # micro-batches per step, summed with lax.scan
    # optimizer: AdamW (or Muon for the block matrices), warmup then cosine decay to min_lr
    optimizer: str = "adamw"  # "adamw", or "muon": Muon on the blocks' matrices, AdamW elsewhere
    learning_rate: float = 6e-4  # peak learning rate (of AdamW)
    min_lr: float = 6e-5  # learning rate at the end of the cosine
    warmup_steps: int = 2000  # linear warmup from 0
    max_steps: int = 600000  # steps to train for
    lr_decay_steps: int = 0  # length of warmup + cosine; 0 means max_steps
    weight_decay: float = 0.1  # applied to matrices only
    independent_weight_decay: bool = False  # scale decay by lr/learning_rate (Wortsman 2023)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    muon_learning_rate: float = 0.02  # Muon's peak lr; its schedule has AdamW's shape
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    muon_ns_steps: int = 5  # Newton-Schulz iterations that orthogonalise each update
    muon_preconditioning: str = "frobenius"  # "aol": a row-rescaled first step (optax), one step less
    normuon: bool = False  # NorMuon: Muon's update evened out per neuron by a second moment
    normuon_beta2: float = 0.95  # NorMuon's second-moment decay
    # float16 compute only (model.compute_dtype): dynamic loss scaling, as torch's GradScaler
    loss_scale_init: float = 2.0**16  # the first loss scale; halved on a step whose grads overflow
    loss_scale_growth_interval: int = 2000  # finite steps in a row after which the scale doubles
    # devices: mesh axes ("data", "fsdp"); data * fsdp devices are used
    data_parallel: int = 1  # size of the "data" axis (pure replication)
    fsdp: int = -1  # size of the "fsdp" axis; -1 means all devices left
    fsdp_min_size: int = 2**18  # arrays with fewer elements are replicated, not sharded
    # evaluation, logging, checkpoints
    eval_interval: int = 2000  # steps between evaluations (and checkpoints)
    eval_iters: int = 200  # batches per evaluation, the same batches every time
    log_interval: int = 10  # steps between console/TensorBoard lines (the only host syncs)
    keep_checkpoints: int = 3  # latest checkpoints kept, plus the best by val loss
    seed: int = 1337  # parameters, dropout and batch order
    init_from: str = ""  # GPT-2 weights to start from: a directory, or gpt2, gpt2-medium, ...
    hellaswag: str = ""  # a HellaSwag jsonl scored at each eval_interval (GPT-2 BPE data only)
    # GPT-2 124M does not rerun bit for bit on a GPU without it (BENCHMARKS.md, "Determinism")
    deterministic: bool = False  # XLA's deterministic GPU kernels: exact reruns, ~10% slower
    profile_steps: int = 5  # steps traced by --debug
    # multi-token prediction (model.multi_token_loss): the logits also score the targets 2..1+k
    # tokens ahead, the i-th further one weighted 0.5**i, each weight falling linearly to 0 (the
    # furthest first) by multi_token_until of the schedule's length (lr_decay_steps or max_steps)
    multi_token: int = 0  # k: targets ahead besides the next one; 0 is off
    multi_token_until: float = 2 / 3
    target_val_loss: float = 0.0  # stop at the first evaluation with val loss <= this; 0: off

    def __post_init__(self):
        """Refuses values that cannot be right, naming the field (launch.py: one line, exit 2)."""
        at_least = {"batch_size": 1, "grad_accum": 1, "max_steps": 1, "warmup_steps": 0,
                    "lr_decay_steps": 0, "data_parallel": 1, "fsdp_min_size": 0,
                    "eval_interval": 1, "eval_iters": 1, "log_interval": 1,
                    "keep_checkpoints": 1, "seed": 0, "profile_steps": 1, "muon_ns_steps": 1,
                    "loss_scale_growth_interval": 1, "multi_token": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= {low}")
        for name in ("learning_rate", "weight_decay", "grad_clip", "min_lr", "muon_learning_rate",
                     "target_val_loss"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be a number >= 0")
        # the run stops when the scale falls below 1 (float16 overflowed unscaled); it is a float32
        if not 1 <= self.loss_scale_init < 2.0**128:
            raise ValueError(f"loss_scale_init={self.loss_scale_init}: must be a number in "
                             "[1, 2**128), e.g. 65536")
        if self.seed >= 2**63:  # jax.random.key takes a signed 64-bit seed
            raise ValueError(f"seed={self.seed}: must be < 2**63")
        if self.learning_rate == 0:
            raise ValueError("learning_rate=0: must be > 0")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr}: must not exceed learning_rate="
                             f"{self.learning_rate}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer={self.optimizer!r}: use 'adamw' or 'muon'")
        if self.muon_learning_rate == 0:
            raise ValueError("muon_learning_rate=0: must be > 0")
        for name in ("beta1", "beta2", "muon_momentum", "normuon_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1)")
        choices = {"muon_preconditioning": ("frobenius", "aol")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: use {' or '.join(map(repr, allowed))}")
        if not 0 < self.multi_token_until <= 1:
            raise ValueError(f"multi_token_until={self.multi_token_until}: must be in (0, 1], "
                             "a fraction of the schedule's length")
        if self.multi_token >= self.model.block_size:
            raise ValueError(f"multi_token={self.multi_token}: must be below model.block_size="
                             f"{self.model.block_size}, the targets a window has")
        if self.fsdp != -1 and self.fsdp < 1:
            raise ValueError(f"fsdp={self.fsdp}: must be >= 1, or -1 for all devices left")

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.batch_size * self.model.block_size


def with_data_vocab(config: TrainConfig, meta: dict) -> TrainConfig:
    """model.vocab_size=0 (unset) becomes the data's (meta.json), as nanoGPT reads it from meta.pkl;
    GPT-2's BPE is padded to a multiple of 64 (50257 -> 50304: faster matmuls). A value the
    config sets is kept (train.open_data checks that it holds the data's vocabulary)."""
    if config.model.vocab_size:
        return config
    vocab = meta["vocab_size"]
    vocab = padded_vocab(vocab) if meta["tokenizer"] == "gpt2" else vocab
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
