#!/usr/bin/env bash
# Compare `stlm eval mc` with EleutherAI lm-evaluation-harness (hf backend, CPU, float32) on local
# copies of the benchmark data, request by request. See README.md.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

usage() {
  cat <<USAGE
usage: $0 MODEL_DIR [--stlm BIN] [--data DIR] [--work DIR] [--limit N] [--tol X]
  MODEL_DIR  model directory written by stlm (config.json, model.safetensors, tokenizer.json)
  --stlm     stlm binary            (default: \$STLM, else $ROOT/target/release/stlm)
  --data     benchmark data         (default: \$DATA_DIR, else $ROOT/../shared/data/eval)
  --work     work directory         (default: \$WORK_DIR, else a fresh mktemp -d)
  --limit    items per task         (default: \$LIMIT, else 100)
  --tol      max |Δ loglikelihood|  (default: \$LL_TOL, else 5e-4)
environment:
  STLM_PYTHON     Python with torch + transformers (default: the one \`cargo xtask env\` names,
                  else ~/.cache/stlm/venv-torch-2.13.0/bin/python)
  LM_EVAL_VENV    reuse this lm_eval venv instead of creating WORK/venv
  BLIMP_PARADIGM  BLiMP paradigm to use (default: anaphor_number_agreement)
exit status: 0 when everything matches, 1 when something differs, 2 on a setup error
USAGE
}
die() { echo "compare.sh: $*" >&2; exit 2; }
checkdir() { [ -d "$1" ] || die "no such directory: $1"; }

MODEL= STLM=${STLM:-$ROOT/target/release/stlm} DATA=${DATA_DIR:-$ROOT/../shared/data/eval}
WORK=${WORK_DIR:-} LIMIT=${LIMIT:-100} TOL=${LL_TOL:-5e-4}
while [ $# -gt 0 ]; do
  case $1 in
    --stlm) STLM=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --limit) LIMIT=$2; shift 2 ;;
    --tol) TOL=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; exit 2 ;;
    *) [ -z "$MODEL" ] || { usage >&2; exit 2; }; MODEL=$1; shift ;;
  esac
done
[ -n "$MODEL" ] || { usage >&2; exit 2; }
checkdir "$MODEL" && MODEL=$(cd "$MODEL" && pwd)
checkdir "$DATA" && DATA=$(cd "$DATA" && pwd)
for f in config.json model.safetensors tokenizer.json; do [ -f "$MODEL/$f" ] || die "$MODEL/$f is missing"; done
for f in arc_easy arc_challenge piqa openbook_qa winogrande lambada_openai; do
  [ -f "$DATA/$f.jsonl" ] || die "$DATA/$f.jsonl is missing"
done
[ -f "$DATA/blimp.zip" ] || die "$DATA/blimp.zip is missing"
[ -x "$STLM" ] || die "stlm binary not found: $STLM (build it with: cargo xtask build)"
STLM=$(cd "$(dirname "$STLM")" && pwd)/$(basename "$STLM")
if [ -z "$WORK" ]; then WORK=$(mktemp -d); else mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd); fi

# Python with torch + transformers
if [ -z "${STLM_PYTHON:-}" ] && command -v cargo >/dev/null; then
  STLM_PYTHON=$(cd "$ROOT" && eval "$(cargo xtask env 2>/dev/null | grep '^export STLM_PYTHON=')" \
    && echo "${STLM_PYTHON:-}") || STLM_PYTHON=
fi
STLM_PYTHON=${STLM_PYTHON:-$HOME/.cache/stlm/venv-torch-2.13.0/bin/python}
"$STLM_PYTHON" -c 'import torch, transformers' 2>/dev/null \
  || die "STLM_PYTHON=$STLM_PYTHON cannot import torch and transformers"
echo "== stlm $STLM"
echo "== model $MODEL, data $DATA, limit $LIMIT, python $STLM_PYTHON"
echo "== work directory $WORK"
START=$SECONDS

# lm_eval venv: its own packages, torch/transformers borrowed from STLM_PYTHON through a .pth file
VENV=${LM_EVAL_VENV:-$WORK/venv}
if [ ! -x "$VENV/bin/lm_eval" ]; then
  echo "== creating $VENV (pip install lm_eval==0.4.13 accelerate, log: $WORK/pip_install.log)"
  "$STLM_PYTHON" -m venv "$VENV"
  purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
  "$STLM_PYTHON" -c "$purelib" > "$("$VENV/bin/python" -c "$purelib")/zz_stlm_torch.pth"
  "$VENV/bin/pip" install --disable-pip-version-check lm_eval==0.4.13 accelerate > "$WORK/pip_install.log" 2>&1 \
    || die "pip install failed, see $WORK/pip_install.log"
fi

# a copy of the model, with the tokenizer_config.json that transformers' AutoTokenizer needs
M=$WORK/model
rm -rf "$M" && mkdir -p "$M"
for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json \
  special_tokens_map.json stlm.toml; do
  [ ! -f "$MODEL/$f" ] || cp "$MODEL/$f" "$M/"
done
[ -f "$M/tokenizer_config.json" ] || "$STLM_PYTHON" - "$M" <<'PY'
import json, sys
m = sys.argv[1]
cfg, tok = json.load(open(f"{m}/config.json")), json.load(open(f"{m}/tokenizer.json"))
names = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
out = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg["max_position_embeddings"]}
for k in ["bos", "eos", "pad"]:
    i = cfg.get(f"{k}_token_id")
    i = i[0] if isinstance(i, list) else i
    if i in names:
        out[f"{k}_token"] = names[i]
json.dump(out, open(f"{m}/tokenizer_config.json", "w"))
print("== wrote tokenizer_config.json:", json.dumps(out))
PY

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=$WORK/hfcache OMP_NUM_THREADS=1
D=$WORK/data
"$STLM_PYTHON" "$HERE/convert.py" "$DATA" "$D" "$LIMIT"
"$STLM_PYTHON" "$HERE/make_greedy.py" "$M" "$DATA/lambada_openai.jsonl" "$D" "$LIMIT" 2> "$WORK/make_greedy.log" \
  || { cat "$WORK/make_greedy.log" >&2; die "make_greedy.py failed"; }
bash "$HERE/make_tasks.sh" "$WORK/tasks" "$D" "$VENV/bin/python"

TASKS=arc_easy,arc_challenge,piqa,openbookqa,winogrande,lambada_openai,blimp,lambada_greedy,lambada_edge
echo "== lm-evaluation-harness (log: $WORK/harness.log)"
rm -rf "$WORK/harness_out"
T0=$SECONDS
"$VENV/bin/lm_eval" --model hf --model_args "pretrained=$M,dtype=float32" --device cpu \
  --include_path "$WORK/tasks" --tasks "local_${TASKS//,/,local_}" \
  --limit "$LIMIT" --batch_size 8 --log_samples --output_path "$WORK/harness_out" > "$WORK/harness.log" 2>&1 \
  || { tail -30 "$WORK/harness.log" >&2; die "lm_eval failed"; }
echo "   $((SECONDS - T0))s"

echo "== stlm eval mc (logs: $WORK/stlm_out)"
S=$WORK/stlm_out
rm -rf "$S" && mkdir -p "$S"
T0=$SECONDS
run() { # name stlm-task data
  "$STLM" --threads 1 eval mc --model "$M" --task "$2" --data "$3" --limit "$LIMIT" --json \
    --log-samples "$S/$1.samples.jsonl" > "$S/$1.json" 2> "$S/$1.log" \
    || { cat "$S/$1.log" >&2; die "stlm eval mc failed on $1"; }
}
for t in arc_easy arc_challenge piqa winogrande lambada_openai; do run $t $t "$DATA/$t.jsonl"; done
run openbookqa openbookqa "$DATA/openbook_qa.jsonl"
run blimp blimp "$D/blimp_one.jsonl"
run lambada_greedy lambada_openai "$D/lambada_greedy_mosaic.jsonl"
run lambada_edge lambada_openai "$D/lambada_edge_mosaic.jsonl"
echo "   $((SECONDS - T0))s"

echo
rc=0
"$STLM_PYTHON" "$HERE/compare.py" "$WORK/harness_out" "$S" "$TOL" > "$WORK/report.md" || rc=$?
cat "$WORK/report.md"
echo
echo "report: $WORK/report.md; total $((SECONDS - START))s; exit $rc"
exit "$rc"
