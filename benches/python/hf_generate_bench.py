"""transformers' side of `stlm bench generate`: greedy tokens/s at batch 1, prompt excluded.

Usage: python hf_generate_bench.py MODEL_DIR [--new-tokens N] [--prompt-tokens P] [--repeats R]

Same protocol as stlm: prompt ids 1..=P (mod vocab), a warm-up, then per repeat the time of N new
tokens minus the time of 1 new token (prefill and first token cancel out); the fastest repeat is
reported as one JSON object with `tokens_per_s`.
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([[i % vocab for i in range(1, args.prompt_tokens + 1)]])
    mask = torch.ones_like(ids)

    def timed(n):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    timed(min(args.new_tokens, 16))
    best = min(timed(args.new_tokens) - timed(1) for _ in range(args.repeats))
    print(json.dumps({
        "tokens_per_s": (args.new_tokens - 1) / best, "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens, "seconds": best, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
    }))


if __name__ == "__main__":
    main()
