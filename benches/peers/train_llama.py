"""PyTorch eager peer of `stlm bench train`: trains the Llama-style model of an stlm run config
(RMSNorm, RoPE, SwiGLU, causal SDPA, tied head; AdamW with decay on matrices only; global-norm
clipping) on random tokens, and prints one JSON object with tokens/s and the step time.

    python benches/peers/train_llama.py --config configs/bench-llama-4m.toml --steps 20

`cargo xtask bench --vs-pytorch` runs it back to back with stlm. Plain PyTorch as most people
write it (nanoGPT style): no torch.compile, the optimizer's default implementation for the device.
"""
import argparse, json, math, time, tomllib
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, self.nh, self.nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.hd, f = h // self.nh, c["intermediate_size"]
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(h, c["eps"]), RMSNorm(h, c["eps"])
        self.q_proj, self.o_proj = nn.Linear(h, self.nh * self.hd, bias=False), nn.Linear(self.nh * self.hd, h, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(h, self.nkv * self.hd, bias=False) for _ in range(2))
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        y = self.input_layernorm(x)
        q = self.q_proj(y).view(b, s, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(y).view(b, s, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(y).view(b, s, self.nkv, self.hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True, enable_gqa=self.nkv != self.nh)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, -1))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["eps"])
        hd = c["hidden_size"] // c["num_attention_heads"]
        inv = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.outer(torch.arange(c["max_position_embeddings"]).float(), inv)
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        resid = 0.02 / math.sqrt(2 * c["num_hidden_layers"])
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=resid if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02)

    def forward(self, ids):
        s = ids.shape[1]
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, self.cos[:s], self.sin[:s])
        return self.norm(x) @ self.embed_tokens.weight.t()  # tied head


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    m, t = cfg["model"], cfg.get("train", {})
    m.setdefault("num_key_value_heads", m["num_attention_heads"])
    m.setdefault("rope_theta", 10000.0)
    m["eps"] = m.get("norm_eps", 1e-6)
    batch, seq = t.get("batch_size", 16), t.get("seq_len", 256)
    torch.manual_seed(t.get("seed", 0))
    model = Llama(m)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.get("weight_decay", 0.1)},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=t.get("lr", 3e-3), betas=(t.get("beta1", 0.9), t.get("beta2", 0.95)), eps=t.get("eps", 1e-8))
    clip = t.get("grad_clip", 1.0)

    def step(i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(m["vocab_size"], (batch, seq + 1), generator=g)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(args.warmup):
        step(i)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    secs = (time.perf_counter() - start) / args.steps
    print(json.dumps({"impl": "pytorch-eager", "torch": torch.__version__, "tokens_per_s": batch * seq / secs,
                      "step_ms": secs * 1e3, "params": sum(p.numel() for p in model.parameters()),
                      "threads": torch.get_num_threads(), "steps": args.steps}))


if __name__ == "__main__":
    main()
