"""A weak model rarely predicts a LAMBADA word, so the real data hardly exercise the greedy=True
path. This writes lambada_greedy_mosaic.jsonl (MosaicML fields) and lambada_greedy.jsonl (HF
`text`) whose target is the model's own greedy word after each LAMBADA context (skipping
contexts where that word is not alphabetic), so most targets are greedy.
Usage: make_greedy.py MODEL_DIR LAMBADA_JSONL OUT_DIR N   (a Python with torch + transformers)"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, src, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
cfg = model.config
pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
pad = pad[0] if isinstance(pad, list) else pad
max_ctx = cfg.max_position_embeddings - 12  # room for the generated tokens
mosaic, hf = [], []
for line in open(src, encoding="utf-8"):
    if len(mosaic) >= n:
        break
    if not line.strip():
        continue
    ctx = json.loads(line)["context"]
    ids = tok(ctx, add_special_tokens=False)["input_ids"][-max_ctx:]
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=pad)
    text = tok.decode(gen[0, len(ids):])
    if not text.startswith(" "):
        continue
    word = text[1:].split(" ")[0].split("\n")[0]
    k = 0  # keep the leading alphabetic run ("the," -> "the")
    while k < len(word) and word[k].isalpha():
        k += 1
    if k == 0:
        continue
    mosaic.append({"context": ctx, "continuation": word[:k]})
    hf.append({"text": ctx + " " + word[:k]})
for name, rows in [("lambada_greedy_mosaic", mosaic), ("lambada_greedy", hf)]:
    with open(f"{out}/{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
print(f"make_greedy: {len(mosaic)} greedy-word LAMBADA items")
