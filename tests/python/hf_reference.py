"""Reference computations with Hugging Face transformers for stlm's parity tests.

Reads a JSON list of tasks from the file given as the only argument:
  {"action": "make", "model_type": "llama"|"mistral"|"mixtral"|"qwen2_moe"|"qwen3_moe"|"doge"|"gpt2", "config": {...}, "dir": D, "ids": [...],
   "seed": S, "new_tokens": N}
      build a random model (weights drawn at a large scale so that differences show), save it
      with save_pretrained to D, write D/reference.safetensors with "logits" [seq, vocab] and
      "greedy" (transformers' greedy generate from the ids, stopping at EOS).
  {"action": "logits", "dir": D, "ids": [...], "out": F}
      load D with AutoModelForCausalLM.from_pretrained and write its logits to F as "logits".
  {"action": "doge_attention", "config": {...}, "seed": S, "batch": B, "seq": N, "out": F}
      build one random DogeAttention layer (eager attention, A randomised), run it on random
      hidden states under a causal mask, and write its parameters (by their names),
      "hidden_states" and "output" to F.
  {"action": "doge_cdmoe", "config": {...}, "seed": S, "batch": B, "seq": N, "out": F}
      the same for one random DogeCDMoE block (its transformers routing mixes tokens).
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
    from transformers import (
        DogeConfig, DogeForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM,
        Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "mixtral": (MixtralConfig, MixtralForCausalLM),
        "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
        "doge": (DogeConfig, DogeForCausalLM),
        "gpt2": (GPT2Config, GPT2LMHeadModel),
    }
    config_cls, model_cls = classes[task["model_type"]]
    config = config_cls(**task["config"])
    config._attn_implementation = "eager"
    torch.manual_seed(task["seed"])
    model = model_cls(config).eval()
    randomize(model, task["seed"])
    model.save_pretrained(task["dir"])
    ids = task["ids"]
    # Logits first: dynamic RoPE in transformers keeps the frequencies of the longest sequence it
    # has seen, so after `generate` a shorter forward would use the longer context's.
    reference_logits = logits_of(model, ids)
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=task["new_tokens"],
        do_sample=False, pad_token_id=0,
    )
    save_file(
        {"logits": reference_logits, "greedy": out[0, len(ids):].contiguous()},
        task["dir"] + "/reference.safetensors",
    )


def logits(task):
    model = AutoModelForCausalLM.from_pretrained(task["dir"], attn_implementation="eager").eval()
    save_file({"logits": logits_of(model, task["ids"])}, task["out"])


def doge_attention(task):
    from transformers import DogeConfig
    from transformers.models.doge.modeling_doge import DogeAttention, DogeRotaryEmbedding

    config = DogeConfig(**task["config"])
    config._attn_implementation = "eager"
    torch.manual_seed(task["seed"])
    layer = DogeAttention(config, layer_idx=0).eval()
    randomize(layer, task["seed"])
    g = torch.Generator().manual_seed(task["seed"] + 1)
    with torch.no_grad():
        layer.A.copy_(0.5 * torch.randn(layer.A.shape, generator=g))
        b, n = task["batch"], task["seq"]
        hidden = torch.randn(b, n, config.hidden_size, generator=g)
        positions = torch.arange(n).unsqueeze(0).expand(b, n)
        cos_sin = DogeRotaryEmbedding(config)(hidden, positions)
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None].expand(b, 1, n, n)
        out, _ = layer(hidden, position_embeddings=cos_sin, attention_mask=mask)
    tensors = {name: p.detach().contiguous() for name, p in layer.named_parameters()}
    tensors.update({"hidden_states": hidden.contiguous(), "output": out.contiguous()})
    save_file(tensors, task["out"])


def doge_cdmoe(task):
    from transformers import DogeConfig
    from transformers.models.doge.modeling_doge import DogeCDMoE

    config = DogeConfig(**task["config"])
    torch.manual_seed(task["seed"])
    layer = DogeCDMoE(config).eval()
    randomize(layer, task["seed"])
    g = torch.Generator().manual_seed(task["seed"] + 1)
    with torch.no_grad():
        hidden = torch.randn(task["batch"], task["seq"], config.hidden_size, generator=g)
        out, _ = layer(hidden)
    tensors = {name: p.detach().contiguous() for name, p in layer.named_parameters()}
    tensors.update({"hidden_states": hidden.contiguous(), "output": out.contiguous()})
    save_file(tensors, task["out"])


def main():
    with open(sys.argv[1]) as f:
        tasks = json.load(f)
    for task in tasks:
        {"make": make, "logits": logits, "doge_attention": doge_attention, "doge_cdmoe": doge_cdmoe}[task["action"]](task)


if __name__ == "__main__":
    main()
