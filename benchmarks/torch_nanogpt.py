"""A PyTorch reference for BENCHMARKS.md: nanoGPT's model and loop, on CPU or on a GPU.

Not part of eqxgpt (torch is not in requirements.txt). The model is nanoGPT's (LayerNorm without
bias, learned positions, tied head, dropout after the embeddings, on the attention probabilities
and on both residual branches), trained as its train.py does (AdamW with decay on 2-D parameters
only, warmup + cosine, clip 1.0). --shape picks the sizes:

  cpu               4 layers, 4 heads, 128 wide, block 64, batch 12, dropout 0: nanoGPT's
                    `config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
                    --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
                    --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`
  shakespeare_char  config/train_shakespeare_char.py: 6 layers, 6 heads, 384 wide, block 256,
                    batch 64, dropout 0.2, lr 1e-3 -> 1e-4, beta2 0.99
  gpt2              GPT-2 small (124M): 12 layers, 12 heads, 768 wide, block 1024, batch 32,
                    vocab 50304, lr 6e-4 -> 6e-5, beta2 0.95

--device=cuda uses nanoGPT's GPU settings: TF32 matmuls, bf16 autocast, fused AdamW,
torch.compile, flash attention, pinned non-blocking batch copies.

Training (the CPU figures in BENCHMARKS.md) reads the same files as eqxgpt and prints val loss;
its ms/step counts every step, so with torch.compile the first step's compile too:

    pip install torch numpy && python benchmarks/torch_nanogpt.py --max_iters=2000

--benchmark_steps=N times the training step instead, as eqxgpt's bench.py does: one first
(compiling) step, --warmup untimed steps, N timed steps, on the batches this repo's
data.BatchSampler draws for steps 0, 1, 2, ... with seed 1337, so both programs see the same
tokens (a Zipf-distributed stream when --data_dir holds no dataset):

    python benchmarks/torch_nanogpt.py --device=cuda --shape=shakespeare_char --benchmark_steps=30
    python benchmarks/torch_nanogpt.py --device=cuda --shape=gpt2 --data_dir=data/shakespeare --benchmark_steps=30
"""

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402  this repo's cli.py: one-line errors, as in eqxgpt's scripts
import data  # noqa: E402  this repo's data.py (numpy only): the same files and sampler as eqxgpt

SHAPES = {  # n_layer, n_head, n_embd, block, batch, vocab, dropout, lr, min_lr, warmup, beta2
    "cpu": (4, 4, 128, 64, 12, 65, 0.0, 1e-3, 1e-4, 100, 0.99),
    "shakespeare_char": (6, 6, 384, 256, 64, 65, 0.2, 1e-3, 1e-4, 100, 0.99),
    "gpt2": (12, 12, 768, 1024, 32, 50304, 0.0, 6e-4, 6e-5, 2000, 0.95),  # 50257 padded to 64s
}


class Block(nn.Module):
    def __init__(self, d, n_head, n_layer, dropout):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        self.resid_dropout, self.mlp_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.n_head, self.dropout = n_head, dropout
        for proj in (self.c_proj, self.mlp_proj):
            proj.scaled_init = True

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # flash attention on a GPU; dropout on the attention probabilities only while training
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        x = x + self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))
        return x + self.mlp_dropout(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, d, dropout):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, n_head, n_layer, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # tied, as nanoGPT
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * n_layer) if getattr(m, "scaled_init", False) else 0.02
                nn.init.normal_(m.weight, 0.0, std)

    def forward(self, idx, targets):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="cpu")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for cuda, off for cpu)")
    p.add_argument("--data_dir", help="default: data/shakespeare for --shape=gpt2, else data/shakespeare_char")
    p.add_argument("--batch_size", type=int, help="default: the shape's")
    p.add_argument("--n_layer", type=int, help="default: the shape's")
    p.add_argument("--dropout", type=float, help="default: the shape's")
    p.add_argument("--max_iters", type=int, default=2000)
    p.add_argument("--eval_iters", type=int, default=20)
    p.add_argument("--benchmark_steps", type=int, default=0, help="> 0: time this many steps, no training")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (--benchmark_steps)")
    p.add_argument("--seed", type=int, default=1337, help="BatchSampler seed (--benchmark_steps)")
    args = p.parse_args()
    if args.benchmark_steps < 0 or args.warmup < 0:
        p.error("--benchmark_steps and --warmup must be >= 0")
    n_layer, n_head, n_embd, block, batch, vocab, dropout, lr, min_lr, warmup, beta2 = SHAPES[args.shape]
    batch = args.batch_size or batch
    n_layer = args.n_layer or n_layer
    dropout = dropout if args.dropout is None else args.dropout
    data_dir = args.data_dir or ("data/shakespeare" if args.shape == "gpt2" else "data/shakespeare_char")
    cuda = args.device == "cuda"
    compile_model = cuda if args.compile is None else args.compile
    if cuda:  # nanoGPT's GPU settings: TF32 where float32 remains, bf16 autocast for the rest
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    sync = torch.cuda.synchronize if cuda else lambda: None  # CUDA runs ahead of the host clock
    torch.manual_seed(1337)

    have_data = all(os.path.isfile(f"{data_dir}/{f}") for f in ("train.bin", "meta.json"))
    if have_data:
        meta = data.load_meta(data_dir)
        if meta["vocab_size"] > vocab:
            raise cli.UserError(f"{data_dir} has vocab {meta['vocab_size']}, "
                                f"more than --shape={args.shape}'s {vocab}")
        splits = {s: data.open_split(data_dir, s, meta) for s in data.SPLITS}
    elif not args.benchmark_steps:
        raise cli.UserError(f"{data_dir} holds no dataset: run `{data.prepare_command(data_dir)}` first")

    def to_device(x, y):
        if cuda:  # pinned host memory lets the copy run asynchronously, as nanoGPT's get_batch
            return x.pin_memory().to("cuda", non_blocking=True), y.pin_memory().to("cuda", non_blocking=True)
        return x, y

    def get_batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - block, (batch,))
        x = torch.stack([torch.from_numpy(d[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
        return to_device(x, y)

    model = GPT(vocab, block, n_layer, n_head, n_embd, dropout).to(args.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, beta2),
                            fused=True if cuda else None)  # None: torch's CPU default, as before
    if compile_model:
        model = torch.compile(model)  # after making the optimizer, as nanoGPT

    def lr_at(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / max(1, args.max_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)

    def train_step(it, x, y):
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        with autocast:
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if args.benchmark_steps:
        if have_data:
            tokens, source = splits["train"], data_dir
        else:  # no dataset: token frequencies falling off as rank^-1.1, as words in text do
            ranks = np.random.default_rng(0).zipf(1.1, size=2**22)
            tokens, source = ((ranks - 1) % vocab).astype(np.int32), "zipf"
        sampler = data.BatchSampler(tokens, block, batch, 1, args.seed)
        # drawn before timing, as bench.py does: host sampling is not the step's cost
        batches = [[torch.from_numpy(a[0].astype(np.int64)) for a in sampler.batch(step)]
                   for step in range(1 + args.warmup + args.benchmark_steps)]

        def run(first, n):
            for step in range(first, first + n):
                train_step(step, *to_device(*batches[step]))

        run(0, 1)  # compiles, with torch.compile
        run(1, args.warmup)
        sync()
        start = time.perf_counter()
        run(1 + args.warmup, args.benchmark_steps)
        sync()
        seconds = (time.perf_counter() - start) / args.benchmark_steps
        name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
        peak = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
        print(f"torch {torch.__version__} {name} shape={args.shape} batch={batch} block={block}: "
              f"{1e3 * seconds:.1f} ms/step, {batch * block / seconds:,.0f} tokens/s{peak}, "
              f"tokens: {source}")
        return

    start = time.perf_counter()
    for it in range(args.max_iters):
        train_step(it, *get_batch("train"))
    sync()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad(), autocast:
        val = np.mean([model(*get_batch("val")).item() for _ in range(args.eval_iters)])
    where = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}: {args.max_iters} steps, "
          f"{1e3 * seconds / args.max_iters:.1f} ms/step, val loss {val:.4f}")


if __name__ == "__main__":
    cli.run_cli(main)  # a bad dataset is one line on stderr, as in eqxgpt's scripts
