"""Per-matrix output error of pruned models, and how uneven the input channels are.

For every linear layer of the dense model, the Gram matrix G = X^T X of its inputs over
calibration windows (the dense model's own activations) gives
- the relative output error of a pruned weight W':  tr((W - W') G (W - W')^T) / tr(W G W^T),
  the quantity Wanda approximates with a diagonal G and SparseGPT minimises with the full G;
- the spread of the input channel norms ||X_j|| = sqrt(G_jj): their coefficient of variation and
  max/median ratio. Wanda's score |W_ij| ||X_j|| differs from magnitude only where they vary.

usage: python layer_error.py DENSE_DIR CALIB.txt PRUNED_DIR... [--windows 64 --len 256]
Prints one line per pruned model (mean relative error per kind of matrix) and the channel spread.
"""
import argparse
import json
import sys

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def grams(model, ids, windows, length):
    """X^T X (float64) of the inputs of every nn.Linear, over evenly spaced windows."""
    sums, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            def hook(m, inp, out, name=name):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
            hooks.append(mod.register_forward_hook(hook))
    starts = [i * (len(ids) - length) // max(windows - 1, 1) for i in range(windows)]
    with torch.no_grad():
        for s in range(0, len(starts), 8):
            batch = torch.tensor([ids[t:t + length] for t in starts[s:s + 8]])
            model(batch)
    for h in hooks:
        h.remove()
    return sums


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dense")
    ap.add_argument("calib")
    ap.add_argument("pruned", nargs="+")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--len", type=int, default=256)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(a.dense, torch_dtype=torch.float32).eval()
    tok = Tokenizer.from_file(f"{a.dense}/tokenizer.json")
    ids = tok.encode(open(a.calib, encoding="utf-8").read()).ids
    g = grams(model, ids, a.windows, a.len)
    dense = {k: v.double() for k, v in load_file(f"{a.dense}/model.safetensors").items()}
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    spread = {}
    for name, G in g.items():
        norms = G.diagonal().sqrt()
        kind = name.split(".")[-1]
        spread.setdefault(kind, []).append((float(norms.std() / norms.mean()), float(norms.max() / norms.median())))
    print("input channel norms ||X_j||: coefficient of variation, max/median (mean over layers)")
    for kind in kinds:
        cv = sum(s[0] for s in spread[kind]) / len(spread[kind])
        ratio = sum(s[1] for s in spread[kind]) / len(spread[kind])
        print(f"  {kind:<10} cv {cv:.3f}  max/median {ratio:.2f}")
    print("relative output error on the dense model's calibration inputs (mean over layers)")
    print("  " + f"{'model':<28}" + "".join(f"{k:>10}" for k in kinds) + f"{'all':>10}")
    out = {}
    for d in a.pruned:
        w = {k: v.double() for k, v in load_file(f"{d}/model.safetensors").items()}
        per_kind = {}
        num = den = 0.0
        for name, G in g.items():
            key = f"{name}.weight"
            W, P = dense[key], w[key]
            e = float(torch.trace((W - P) @ G @ (W - P).T))
            base = float(torch.trace(W @ G @ W.T))
            per_kind.setdefault(name.split(".")[-1], []).append(e / base)
            num, den = num + e, den + base
        row = {k: sum(v) / len(v) for k, v in per_kind.items()}
        row["all"] = num / den
        out[d] = row
        print("  " + f"{d.rstrip('/').split('/')[-1]:<28}" + "".join(f"{row[k]:>10.4f}" for k in kinds) + f"{row['all']:>10.4f}")
    if "--json" in sys.argv:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
