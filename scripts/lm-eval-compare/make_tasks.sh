#!/usr/bin/env bash
# Write lm-evaluation-harness task YAMLs: copies of lm_eval 0.4.x's official configs for
# arc_easy, arc_challenge, piqa, openbookqa, winogrande, lambada_openai and blimp, reading the
# local json files that convert.py / make_greedy.py wrote.
# Usage: make_tasks.sh TASKS_DIR DATA_DIR LM_EVAL_PYTHON
set -euo pipefail
T=$1 D=$2 PY=$3
mkdir -p "$T"
hdr() { printf "task: %s\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n    test: '%s'\ntest_split: test\n" "local_$1" "$D/$2.jsonl"; }
acc='metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true'
acc_norm="$acc
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true"
ver='metadata:
  version: 1.0'

for t in arc_easy arc_challenge; do
  { hdr $t $t; cat <<EOF2
output_type: multiple_choice
doc_to_text: "Question: {{question}}\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
$acc_norm
$ver
EOF2
  } > "$T/local_$t.yaml"
done

{ hdr piqa piqa; cat <<EOF2
output_type: multiple_choice
doc_to_text: "Question: {{goal}}\nAnswer:"
doc_to_target: label
doc_to_choice: "{{[sol1, sol2]}}"
$acc_norm
$ver
EOF2
} > "$T/local_piqa.yaml"

{ hdr openbookqa openbookqa; cat <<EOF2
output_type: multiple_choice
doc_to_text: question_stem
doc_to_target: "{{choices.label.index(answerKey.lstrip())}}"
doc_to_choice: "{{choices.text}}"
$acc_norm
$ver
EOF2
} > "$T/local_openbookqa.yaml"

# winogrande's config calls functions from lm_eval's own preprocess_winogrande.py
cp "$("$PY" -c 'import lm_eval, os; print(os.path.dirname(lm_eval.__file__))')/tasks/winogrande/preprocess_winogrande.py" "$T/"
{ hdr winogrande winogrande; cat <<EOF2
output_type: multiple_choice
doc_to_text: !function preprocess_winogrande.doc_to_text
doc_to_target: !function preprocess_winogrande.doc_to_target
doc_to_choice: !function preprocess_winogrande.doc_to_choice
$acc
$ver
EOF2
} > "$T/local_winogrande.yaml"

{ hdr blimp blimp_one; cat <<EOF2
output_type: multiple_choice
doc_to_text: ""
doc_to_target: 0
doc_to_choice: "{{[sentence_good, sentence_bad]}}"
num_fewshot: 0
$acc
$ver
EOF2
} > "$T/local_blimp.yaml"

# lambada_openai, and the same config on the greedy-word items and on the edge item
for t in lambada_openai lambada_greedy lambada_edge; do
  { hdr $t $t; cat <<EOF2
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
$ver
EOF2
  } > "$T/local_$t.yaml"
done
echo "make_tasks: task YAMLs in $T"
