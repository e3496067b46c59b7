"""Two stlm builds against each other: greedy decoding speed (`stlm bench generate`, one-token
prompt, STEPS new tokens) of each model directory at each thread count, in interleaved rounds so
that a noisy machine slows both builds alike. Prints the medians and every round.

Usage: python ab_generate.py OLD_STLM NEW_STLM MODEL_DIR [MODEL_DIR ...] [--rounds 5]
       [--steps 127] [--threads 1 2]
"""
import argparse
import json
import os
import statistics
import subprocess


def speed(exe, model, threads, steps):
    cmd = [exe, "--threads", str(threads), "bench", "generate", "--model", model, "--new-tokens", str(steps),
           "--prompt-tokens", "1", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=127)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    runs = {}
    for _ in range(args.rounds):
        for t in args.threads:
            for m in args.models:
                for name, exe in (("old", args.old), ("new", args.new)):
                    runs.setdefault((os.path.basename(m.rstrip("/")), t, name), []).append(speed(exe, m, t, args.steps))
    for (m, t, name), v in sorted(runs.items()):
        print(f"{m} {t} thread(s) {name}: median {statistics.median(v):.1f} tokens/s, rounds {[round(x) for x in v]}")


if __name__ == "__main__":
    main()
