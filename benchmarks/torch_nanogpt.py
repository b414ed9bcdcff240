"""A PyTorch reference for BENCHMARKS.md: nanoGPT's model and loop, laptop Shakespeare config.

Not part of eqxgpt (torch is not in requirements.txt). It reproduces nanoGPT's train.py with
`config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0` (LayerNorm without bias, learned positions, tied head, AdamW with decay on 2-D
parameters only, warmup + cosine), reading the same data/shakespeare_char files as eqxgpt.

    pip install torch numpy && python benchmarks/torch_nanogpt.py --max_iters=2000
"""

import argparse
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, n_head, n_layer):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        self.n_head = n_head
        for proj in (self.c_proj, self.mlp_proj):
            proj.scaled_init = True

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, d):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, n_head, n_layer) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # tied, as nanoGPT
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * n_layer) if getattr(m, "scaled_init", False) else 0.02
                nn.init.normal_(m.weight, 0.0, std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", default="data/shakespeare_char")
    p.add_argument("--max_iters", type=int, default=2000)
    p.add_argument("--eval_iters", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(1337)
    block, batch, lr, min_lr, warmup = 64, 12, 1e-3, 1e-4, 100
    data = {s: np.memmap(f"{args.data_dir}/{s}.bin", dtype=np.uint16, mode="r") for s in ("train", "val")}

    def get_batch(split):
        d = data[split]
        ix = torch.randint(len(d) - block, (batch,))
        x = torch.stack([torch.from_numpy(d[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
        return x, y

    model = GPT(65, block, 4, 4, 128)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))

    def lr_at(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (args.max_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    start = time.perf_counter()
    for it in range(args.max_iters):
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        x, y = get_batch("train")
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        val = np.mean([model(*get_batch("val")).item() for _ in range(args.eval_iters)])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: {args.max_iters} steps, "
          f"{1e3 * seconds / args.max_iters:.1f} ms/step, val loss {val:.4f}")


if __name__ == "__main__":
    main()
