"""Reference computations with Hugging Face transformers for stlm's parity tests.

Reads a JSON list of tasks from the file given as the only argument:
  {"action": "make", "model_type": "llama"|"gpt2", "config": {...}, "dir": D, "ids": [...],
   "seed": S, "new_tokens": N}
      build a random model (weights drawn at a large scale so that differences show), save it
      with save_pretrained to D, write D/reference.safetensors with "logits" [seq, vocab] and
      "greedy" (transformers' greedy generate from the ids, stopping at EOS).
  {"action": "logits", "dir": D, "ids": [...], "out": F}
      load D with AutoModelForCausalLM.from_pretrained and write its logits to F as "logits".
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().contiguous()


def make(task):
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "gpt2": (GPT2Config, GPT2LMHeadModel)}
    config_cls, model_cls = classes[task["model_type"]]
    config = config_cls(**task["config"])
    config._attn_implementation = "eager"
    torch.manual_seed(task["seed"])
    model = model_cls(config).eval()
    randomize(model, task["seed"])
    model.save_pretrained(task["dir"])
    ids = task["ids"]
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=task["new_tokens"],
        do_sample=False, pad_token_id=0,
    )
    save_file(
        {"logits": logits_of(model, ids), "greedy": out[0, len(ids):].contiguous()},
        task["dir"] + "/reference.safetensors",
    )


def logits(task):
    model = AutoModelForCausalLM.from_pretrained(task["dir"], attn_implementation="eager").eval()
    save_file({"logits": logits_of(model, task["ids"])}, task["out"])


def main():
    with open(sys.argv[1]) as f:
        tasks = json.load(f)
    for task in tasks:
        {"make": make, "logits": logits}[task["action"]](task)


if __name__ == "__main__":
    main()
