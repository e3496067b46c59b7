"""Compare stlm's --log-samples output with lm-evaluation-harness's --log_samples output, item by
item and request by request. Prints a markdown summary table and the findings; exits 1 when a
request string, a per-item prediction/score/greedy flag, an item count or a task's acc/acc_norm
differs, or when max |Δ loglikelihood| exceeds the tolerance.
Usage: compare.py HARNESS_OUT_DIR STLM_OUT_DIR [LL_TOL]"""
import glob
import json
import math
import os
import sys

HARNESS, STLM = sys.argv[1], sys.argv[2]
TOL = float(sys.argv[3]) if len(sys.argv) > 3 else 5e-4
TASKS = ["arc_easy", "arc_challenge", "piqa", "openbookqa", "winogrande", "lambada_openai", "blimp",
         "lambada_greedy", "lambada_edge"]


def newest(pattern):
    files = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not files:
        print(f"compare: nothing matches {pattern}", file=sys.stderr)
        sys.exit(2)
    return files[-1]


def argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, like np.argmax


def fmt(x):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def short(s, n=120):
    s = repr(s)
    return s if len(s) <= n else s[: n // 2] + " … " + s[-n // 2:]


results = json.load(open(newest(f"{HARNESS}/*/results_*.json")))["results"]
rows, findings, failed = [], [], False
for task in TASKS:
    hres = results.get(f"local_{task}")
    if hres is None or not os.path.exists(f"{STLM}/{task}.json"):
        findings.append(f"{task}: missing output (harness: {hres is not None}, stlm: {os.path.exists(f'{STLM}/{task}.json')})")
        failed = True
        continue
    hs = sorted((json.loads(l) for l in open(newest(f"{HARNESS}/*/samples_local_{task}_*.jsonl"), encoding="utf-8")),
                key=lambda s: s["doc_id"])
    ss = [json.loads(l) for l in open(f"{STLM}/{task}.samples.jsonl", encoding="utf-8")]
    ssum = json.load(open(f"{STLM}/{task}.json"))
    if len(ss) != len(hs):
        findings.append(f"{task}: item count differs: harness {len(hs)}, stlm {len(ss)}")
        failed = True
    max_d, req_diff, pred_diff = 0.0, 0, 0
    for h, s in zip(hs, ss):
        doc = h["doc_id"]
        args = sorted(h["arguments"].items(), key=lambda kv: int(kv[0].split("_")[-1]))
        hreq = [(a["arg_0"], a["arg_1"]) for _, a in args]
        hll = [float(r[0][0]) for r in h["resps"]]
        hgr = [r[0][1] in (True, "True") for r in h["resps"]]
        sreq, sll, sgr = [tuple(r) for r in s["requests"]], s["logprobs"], s["greedy"]
        if s["doc"] != doc or hreq != sreq:
            req_diff += 1
            findings.append(f"{task} doc {doc}: request strings differ (stlm doc {s['doc']}, "
                            f"{len(hreq)} harness / {len(sreq)} stlm requests)")
            for j, (a, b) in enumerate(zip(hreq, sreq)):
                if a[0] != b[0]:
                    findings.append(f"  request {j} context: harness {short(a[0])}, stlm {short(b[0])}")
                if a[1] != b[1]:
                    findings.append(f"  request {j} continuation: harness {a[1]!r}, stlm {b[1]!r} (context {short(a[0])})")
        for j, (a, b) in enumerate(zip(hll, sll)):
            max_d = max(max_d, abs(a - b))
            if abs(a - b) > TOL:
                findings.append(f"{task} doc {doc} request {j}: |Δll| = {abs(a - b):.3g} (harness {a}, stlm {b})")
        # prediction: the greedy flag for LAMBADA, argmax (and length-normalised argmax) otherwise
        why = []
        if hgr != sgr:
            why.append(f"greedy flags harness {hgr}, stlm {sgr}")
        if not task.startswith("lambada") and len(hll) == len(sll):
            if argmax(hll) != argmax(sll):
                why.append(f"argmax harness {argmax(hll)}, stlm {argmax(sll)}")
            if "acc_norm" in h:
                lens = [float(len(c[1:] if c.startswith(" ") else c)) for _, c in hreq]
                hn, sn = argmax([x / l for x, l in zip(hll, lens)]), argmax([x / l for x, l in zip(sll, lens)])
                if hn != sn:
                    why.append(f"acc_norm argmax harness {hn}, stlm {sn}")
        for k in ["acc", "acc_norm"]:
            if k in h and h[k] != s.get(k):
                why.append(f"{k} harness {h[k]}, stlm {s.get(k)}")
        if why:
            pred_diff += 1
            findings.append(f"{task} doc {doc}: prediction differs: " + "; ".join(why))
    for k in ["acc", "acc_norm"]:
        hv, sv = hres.get(f"{k},none"), ssum.get(k)
        if (hv is None) != (sv is None) or (hv is not None and abs(hv - sv) > 1e-9):
            findings.append(f"{task}: {k} differs: harness {hv}, stlm {sv}")
            failed = True
    failed |= req_diff > 0 or pred_diff > 0 or max_d > TOL
    rows.append([task, f"{len(hs)}/{ssum['n']}", fmt(hres.get("acc,none")), fmt(ssum.get("acc")),
                 fmt(hres.get("acc_norm,none")), fmt(ssum.get("acc_norm")), f"{max_d:.2e}", req_diff, pred_diff])

print("| task | n (harness/stlm) | acc harness | acc stlm | acc_norm harness | acc_norm stlm | max \\|Δll\\| "
      "| differing requests | differing predictions |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(map(str, r)) + " |")
print(f"\n**{'FAIL' if failed else 'PASS'}** (|Δll| tolerance {TOL:g})")
if findings:
    print(f"\n### Findings ({len(findings)})")
    for f in findings[:50]:
        print("- " + f)
    if len(findings) > 50:
        print(f"- … and {len(findings) - 50} more")
sys.exit(1 if failed else 0)
