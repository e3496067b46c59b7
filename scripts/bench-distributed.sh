#!/usr/bin/env bash
# Data-parallel scaling on this machine: `stlm train` with configs/default.toml (~2M parameters)
# on the same global batch of 16 windows x 128 tokens, as 1 process and as 2 gloo ranks
# (`--nproc 2`, 8 windows each), for a few thread settings. Prints a markdown table of training
# tokens/s (every rank's tokens; mean of the metrics lines after the first, which includes
# start-up) and the final losses, which agree up to float rounding.
#   cargo xtask build && scripts/bench-distributed.sh target/release/stlm [STEPS]
set -euo pipefail
BIN=$1; STEPS=${2:-120}
C=$(cd "$(dirname "$0")/../configs" && pwd)
O=$(mktemp -d); trap 'rm -rf "$O"' EXIT
"$BIN" data stories --count 2000 --out "$O/stories.txt" >/dev/null
common=(--config "$C/default.toml" --data "$O/stories.txt" --max-steps "$STEPS" --samples 0
        --set train.log_every=20 --set train.eval_every=0 --set train.save_every=0)
tps() { python3 - "$1/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rest = rows[1:] or rows
print(f"{sum(r['tokens_per_s'] for r in rest) / len(rest):.0f} {rows[-1]['loss']:.6f}")
PY
}
echo "| processes | threads each | batch per rank | tokens/s | vs 1 process | loss at step $STEPS |"
echo "|---|---|---|---|---|---|"
base=""
for setting in "1 2 16" "2 1 8" "2 2 8" "1 1 16"; do
  read -r procs threads batch <<<"$setting"
  out="$O/run-$procs-$threads"
  if [ "$procs" = 1 ]; then
    "$BIN" --threads "$threads" train "${common[@]}" --out "$out" --set train.batch_size="$batch" 2>"$out.log"
  else
    "$BIN" --threads "$threads" train "${common[@]}" --out "$out" --set train.batch_size="$batch" --nproc "$procs" 2>"$out.log"
  fi
  read -r t loss <<<"$(tps "$out")"
  [ -z "$base" ] && base=$t
  ratio=$(python3 -c "print(f'{$t / $base:.2f}x')")
  echo "| $procs | $threads | $batch | $t | $ratio | $loss |"
done
