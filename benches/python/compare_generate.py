"""Paired, interleaved measurement of `stlm bench generate` against transformers' `generate`.

Usage: python compare_generate.py STLM_BINARY MODEL_DIR [--pairs 8] [--new-tokens 128]

Runs the two benchmarks alternately `--pairs` times on the same model directory (so that a noisy
machine slows both sides of a pair alike), prints each pair, and ends with one JSON object:
the median tokens/s of each side and the median of the per-pair ratios.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stlm")
    ap.add_argument("model")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    n = str(args.new_tokens)
    ours, theirs, ratios = [], [], []
    for i in range(args.pairs):
        s = run_json([args.stlm, "bench", "generate", "--model", args.model, "--new-tokens", n, "--json"])["tokens_per_s"]
        h = run_json([sys.executable, os.path.join(HERE, "hf_generate_bench.py"), args.model, "--new-tokens", n])["tokens_per_s"]
        ours.append(s)
        theirs.append(h)
        ratios.append(s / h)
        print(f"pair {i + 1}: stlm {s:.1f} tokens/s, transformers {h:.1f} tokens/s, ratio {s / h:.2f}", file=sys.stderr)
    print(json.dumps({
        "pairs": args.pairs, "new_tokens": args.new_tokens,
        "stlm_tokens_per_s": statistics.median(ours), "transformers_tokens_per_s": statistics.median(theirs),
        "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
    }))


if __name__ == "__main__":
    main()
