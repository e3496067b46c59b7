"""Paired, interleaved greedy decoding speed: `stlm bench generate` against llama2.c's run.c on
the same weights, at each thread count.

Usage: python compare_run_c.py STLM_BINARY RUN_C_SOURCE MODEL_DIR [--pairs 10] [--steps 256]
       [--threads 1 2] [--also DIR ...] [--llama-bench LLAMA_BENCH_BINARY]

Exports MODEL_DIR with `stlm export llama2c` (version 0, what run.c reads), builds run.c as
llama2.c's Makefile builds `runomp` (gcc -Ofast -fopenmp -march=native), and writes a
tokenizer.bin of placeholder pieces (run.c needs one; printing is not what is measured). Each pair
runs both sides once per thread count, alternately, so that a noisy machine slows both alike:
run.c from BOS for STEPS positions, reporting (STEPS - 1) / seconds after its first token;
stlm for STEPS - 1 new tokens after a one-token prompt, the fastest of 3 repeats minus the first
token. `--also` times more stlm model directories of the same weights in every pair (quantized
copies from `stlm quantize`), each against the same run.c runs. `--llama-bench` (llama.cpp's,
built by benches/llama_cpp/build.sh) also times every model directory's `stlm export gguf` (its
own blocks for quantized ones, so llama.cpp runs the same weights) in every pair: `llama-bench
-p 0 -n STEPS -r 1` at the same thread count, its tokens/s. Ends with one JSON object: per
thread count the medians and the per-pair ratios.
"""
import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile


def stlm_speed(stlm, model, threads, new_tokens):
    cmd = [stlm, "--threads", str(threads), "bench", "generate", "--model", model, "--new-tokens", str(new_tokens),
           "--prompt-tokens", "1", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def run_c_speed(exe, workdir, checkpoint, threads, steps, repeats=3):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    best = 0.0
    for _ in range(repeats):
        out = subprocess.run([exe, checkpoint, "0.0", str(steps)], check=True, capture_output=True, text=True,
                             cwd=workdir, env=env).stdout
        best = max(best, float(re.search(r"achieved tok/s: ([0-9.]+)", out).group(1)))
    return best


def llama_bench_speed(exe, gguf, threads, steps):
    cmd = [exe, "-m", gguf, "-p", "0", "-n", str(steps), "-t", str(threads), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["avg_ts"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("stlm")
    ap.add_argument("run_c")
    ap.add_argument("model")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--also", nargs="*", default=[])
    ap.add_argument("--llama-bench")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="stlm-run-c-")
    exe = os.path.join(work, "run")
    subprocess.run(["gcc", "-Ofast", "-fopenmp", "-march=native", args.run_c, "-lm", "-o", exe], check=True)
    checkpoint = os.path.join(work, "model.bin")
    subprocess.run([args.stlm, "export", "llama2c", "--model", args.model, "--out", checkpoint], check=True,
                   stdout=subprocess.DEVNULL)
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    with open(os.path.join(work, "tokenizer.bin"), "wb") as f:
        f.write(struct.pack("<I", 16))
        for i in range(vocab):
            piece = f"<{i}>".encode()
            f.write(struct.pack("<fi", 0.0, len(piece)) + piece)
    models = [args.model] + args.also
    ggufs = {}
    if args.llama_bench:
        for m in models:
            ggufs[m] = os.path.join(work, os.path.basename(m.rstrip("/")) + ".gguf")
            subprocess.run([args.stlm, "export", "gguf", "--model", m, "--out", ggufs[m]], check=True, stdout=subprocess.DEVNULL)
    # The llama.cpp runs are keyed by their GGUF path.
    timed = models + list(ggufs.values())
    results = {t: ({m: [] for m in timed}, [], {m: [] for m in timed}) for t in args.threads}
    for i in range(args.pairs):
        for t in args.threads:
            ours, theirs, ratios = results[t]
            speeds = {m: stlm_speed(args.stlm, m, t, args.steps - 1) for m in models}
            speeds.update({g: llama_bench_speed(args.llama_bench, g, t, args.steps) for g in ggufs.values()})
            c = run_c_speed(exe, work, checkpoint, t, args.steps)
            theirs.append(c)
            for m, s in speeds.items():
                ours[m].append(s)
                ratios[m].append(s / c)
                who = "llama.cpp" if m.endswith(".gguf") else "stlm"
                print(f"pair {i + 1}, {t} thread(s): {who} {os.path.basename(m)} {s:.1f} tokens/s, run.c {c:.1f} "
                      f"tokens/s, ratio {s / c:.2f}", file=sys.stderr)
    summary = {"pairs": args.pairs, "steps": args.steps, "by_threads": {}}
    for t, (ours, theirs, ratios) in results.items():
        row = {"run_c_tokens_per_s": statistics.median(theirs), "run_c": theirs}
        for m in timed:
            who = "llama.cpp" if m.endswith(".gguf") else "stlm"
            key = who if m == args.model else f"{who} {os.path.basename(m.rstrip('/'))}"
            r = ratios[m]
            row[key] = {"tokens_per_s": statistics.median(ours[m]), "median_ratio": statistics.median(r),
                        "min_ratio": min(r), "max_ratio": max(r), "runs": ours[m]}
        summary["by_threads"][str(t)] = row
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
