"""Write the first N MosaicML-format items of each task with the Hugging Face field names that
lm-evaluation-harness's task configs read, plus the BLiMP paradigm and the LAMBADA edge item.
Usage: convert.py SRC_DIR OUT_DIR N   (env BLIMP_PARADIGM, default anaphor_number_agreement)"""
import json
import os
import string
import sys
import zipfile

SRC, OUT, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
BLIMP_PARADIGM = os.environ.get("BLIMP_PARADIGM", "anaphor_number_agreement")
LABELS = string.ascii_uppercase


def read(name):
    with open(f"{SRC}/{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def write(name, items):
    with open(f"{OUT}/{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(it, ensure_ascii=False) + "\n" for it in items)


def strip_prefix(s, p):
    assert s.startswith(p), (s, p)
    return s[len(p):]


os.makedirs(OUT, exist_ok=True)

for name in ["arc_easy", "arc_challenge"]:
    items = []
    for i, r in enumerate(read(name)[:N]):
        labels = list(LABELS[: len(r["choices"])])
        items.append({"id": str(i), "question": strip_prefix(r["query"], "Question: "),
                      "choices": {"text": r["choices"], "label": labels}, "answerKey": labels[r["gold"]]})
    write(name, items)

items = []
for r in read("piqa")[:N]:
    q = strip_prefix(r["query"], "Question: ")
    assert q.endswith("\n") and len(r["choices"]) == 2
    items.append({"goal": q[:-1], "sol1": r["choices"][0], "sol2": r["choices"][1], "label": r["gold"]})
write("piqa", items)

items = []
for i, r in enumerate(read("openbook_qa")[:N]):
    labels = list(LABELS[: len(r["choices"])])
    items.append({"id": str(i), "question_stem": r["query"], "choices": {"text": r["choices"], "label": labels},
                  "answerKey": labels[r["gold"]]})
write("openbookqa", items)

items = []
for r in read("winogrande")[:N]:
    a, b = r["context_options"]
    # sentence[:blank] is the common prefix of the two options, cut back to a word boundary
    # (the requests only depend on sentence[:blank] + option, so the exact cut does not matter).
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    while k > 0 and a[k - 1] not in " \n\t\"'(":
        k -= 1
    prefix = a[:k]
    assert "_" not in prefix
    sentence = prefix + "_ " + r["continuation"].strip()
    items.append({"sentence": sentence, "option1": a[k:], "option2": b[k:], "answer": str(r["gold"] + 1)})
write("winogrande", items)

lambada = read("lambada_openai")
write("lambada_openai", [{"text": r["context"] + " " + r["continuation"]} for r in lambada[:N]])

with zipfile.ZipFile(f"{SRC}/blimp.zip") as z:
    text = z.read(f"data/{BLIMP_PARADIGM}.jsonl").decode("utf-8")
with open(f"{OUT}/blimp_one.jsonl", "w", encoding="utf-8") as f:
    f.write("\n".join([l for l in text.splitlines() if l.strip()][:N]) + "\n")

# LAMBADA items whose MosaicML continuation holds whitespace (item 4462 of 5153, "\n\nrecorder");
# not among the first N, so they get their own task.
edge = [r for r in lambada if r["continuation"] != r["continuation"].strip()]
write("lambada_edge_mosaic", edge)
write("lambada_edge", [{"text": r["context"] + " " + r["continuation"]} for r in edge])
print(f"convert: {N} items per task in {OUT} (BLiMP paradigm {BLIMP_PARADIGM}), {len(edge)} lambada_edge item(s)")
