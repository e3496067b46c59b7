#!/usr/bin/env bash
# Bit-identity check for refactors: run the same small jobs with two stlm binaries (one built
# before the change, one after) and diff what this prints.
#   scripts/refactor-check.sh target/debug/stlm /tmp/check-after > after.txt   # likewise before
#   diff before.txt after.txt
# Jobs: a dense run (grad_accum 2), Switch and aux-free MoE runs, a teacher cache and a student
# distilled from it, a cubic prune schedule (2 stages of magnitude pruning + fine-tuning), and the
# attention kinds that learn tensors (ssmax, temperature, doge-dma), a shared block with per-layer
# LoRA deltas, a diamond of per-layer widths and a byte-pooled model. Printed: every metrics line's
# step, loss, validation loss, gradient norm and MoE aux losses (full precision), and the sha256
# of every model directory's weights.
set -euo pipefail
BIN=$1; O=$2; C=$(cd "$(dirname "$0")/../configs" && pwd)
rm -rf "$O"; mkdir -p "$O"
$BIN data stories --count 1500 --out "$O/stories.txt" >/dev/null
small="--set train.batch_size=8 --set train.seq_len=64 --set train.eval_every=10 --set train.log_every=5 --set train.save_every=10 --set train.grad_accum=2 --set train.eval_batches=2 --set train.warmup_steps=5"
run() { local name=$1; shift; "$BIN" "$@" 2>"$O/$name.log" >"$O/$name.out"; }
run dense train --config "$C/default.toml" --data "$O/stories.txt" --out "$O/dense" --max-steps 30 $small --samples 0
run switch train --config "$C/moe-switch.toml" --data "$O/stories.txt" --out "$O/switch" --max-steps 20 $small --samples 0
run auxfree train --config "$C/moe-aux-free.toml" --data "$O/stories.txt" --out "$O/auxfree" --max-steps 20 $small --samples 0
for k in ssmax temperature doge-dma; do
  run "$k" train --config "$C/attn-$k.toml" --data "$O/stories.txt" --out "$O/$k" --max-steps 12 $small --samples 0
done
run lora train --config "$C/share-albert.toml" --data "$O/stories.txt" --out "$O/lora" --max-steps 12 $small --samples 0 \
  --set model.layer_sharing.lora_rank=4 --set model.layer_sharing.repeats=3
run diamond train --config "$C/shape-diamond.toml" --data "$O/stories.txt" --out "$O/diamond" --max-steps 12 $small --samples 0
run bytes train --config "$C/bytes-5m.toml" --data "$O/stories.txt" --out "$O/bytes" --max-steps 12 $small --samples 0 \
  --set model.hidden_size=64 --set model.intermediate_size=172 --set model.num_hidden_layers=2 --set model.num_attention_heads=4 \
  --set model.num_key_value_heads=4
run cache distill cache --teacher "$O/dense/model" --data "$O/stories.txt" --out "$O/cache" --seq-len 64 --max-windows 96 --top-k 16
run student distill --cache "$O/cache" --student "$C/default.toml" --set model.hidden_size=64 --set model.intermediate_size=172 \
  --set model.num_hidden_layers=2 $small --max-steps 20 --out "$O/student" --loss srkl --alpha 0.7
sed -e 's/^max_steps.*/max_steps = 6/' -e 's/^batch_size.*/batch_size = 8/' -e 's/^seq_len.*/seq_len = 64/' \
  -e 's/^eval_every.*/eval_every = 3/' -e 's/^eval_batches.*/eval_batches = 2/' "$C/default.toml" > "$O/ft.toml"
run pruned prune --model "$O/dense/model" --method magnitude --sparsity 0.5 --schedule cubic --stages 2 --stage-steps 6 \
  --train-config "$O/ft.toml" --data "$O/stories.txt" --out "$O/pruned" --json
for m in $(cd "$O" && find . -name metrics.jsonl | sort); do
  echo "== $m"
  python3 -c "
import json, sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    print(d['step'], repr(d['loss']), repr(d.get('val_loss')), repr(d['grad_norm']), [m['aux_loss'] for m in d.get('moe', [])])
" "$O/$m"
done
(cd "$O" && find . -name model.safetensors | sort | xargs sha256sum)
