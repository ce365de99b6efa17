"""Training speed on data of mixed lengths, with and without --group-by-length.

Real Tulu data mixes one-line questions with long multi-turn conversations; a
micro-batch is padded to its longest example, so in shuffled order most of the
compute of a batch goes to padding. --group-by-length sorts each optimiser step's
examples longest first before cutting them into micro-batches: the same examples
and the same summed gradient per step, far less padding.

    python bench/length_grouping.py [--steps 6]

Builds a file of 512 conversations, 3 in 4 of them one exchange from data/ and 1 in 4
a long multi-turn one (20-60 exchanges, up to --max-seq-length 1024 tokens), then runs
`tulu.py sft --method full` on the model shape of the tiny demo (random weights, fp32,
this CPU) with batch 4 x grad-accum 8, once in shuffled order and once grouped,
interleaved; prints the share of padded positions and the learned tokens per second.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import llama  # noqa: E402
import tulu  # noqa: E402
from machinery import outputs  # noqa: E402
from machinery.data import read_jsonl  # noqa: E402
from machinery.demo import TINY  # noqa: E402


def mixed_file(path, n=512, seed=0):
    r = random.Random(seed)
    convs = [obj["messages"] for _, obj in read_jsonl(os.path.join(tulu.DATA, "sft_train.jsonl"), "sft")]
    turns = [[m for m in c if m["role"] != "system"][:2] for c in convs]
    with open(path, "w") as f:
        for i in range(n):
            if r.random() < 0.25:
                msgs = [m for _ in range(r.randint(20, 60)) for m in r.choice(turns)]
            else:
                msgs = r.choice(turns)
            f.write(json.dumps({"messages": msgs}) + "\n")


def tiny_model(folder):
    """The demo's shape with random weights and the demo's tokenizer files (from the cache)."""
    demo = tulu.tiny_default()
    tok = llama.Tokenizer(demo)
    cfg = llama.LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                            **{**TINY, "max_position_embeddings": 1024})
    torch.manual_seed(0)
    llama.save_model(llama.Llama(cfg), folder)
    outputs.copy_tokenizer(demo, folder)


def run(model, data, out, steps, grouped, padded):
    padded.clear()
    t = time.perf_counter()
    tulu.main(["sft", "--model", model, "--data", data, "--method", "full", "--output", out, "--max-steps",
               str(steps), "--batch-size", "4", "--grad-accum", "8", "--max-seq-length", "1024", "--lr", "1e-4",
               "--num-workers", "1"] + ["--group-by-length"] * grouped)
    seconds = time.perf_counter() - t
    with open(os.path.join(out, "metrics.jsonl")) as f:
        tokens = sum(json.loads(line)["tokens"] for line in f)
    return tokens, seconds, sum(p for p, _ in padded) / sum(n for _, n in padded)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tulu-group-")
    data, model = os.path.join(work, "mixed.jsonl"), os.path.join(work, "model")
    mixed_file(data)
    tiny_model(model)
    padded, collate = [], tulu.SFTTask.collate

    def counting_collate(self, examples):  # (padded positions, all positions) of each micro-batch
        longest = max(len(e[0]) for e in examples)
        padded.append((sum(longest - len(e[0]) for e in examples), longest * len(examples)))
        return collate(self, examples)
    tulu.SFTTask.collate = counting_collate

    results = {False: [], True: []}
    for rep in range(2):
        for grouped in (False, True):
            results[grouped].append(run(model, data, os.path.join(work, f"out{grouped}{rep}"), args.steps, grouped,
                                        padded))
    print(f"\nmachine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.steps} steps of 32 conversations, twice each, interleaved")
    for grouped, name in ((False, "shuffled order"), (True, "--group-by-length")):
        tokens, seconds = sum(r[0] for r in results[grouped]), sum(r[1] for r in results[grouped])
        print(f"{name:18s}: {results[grouped][0][2]:.0%} of positions padded, {tokens / seconds:,.0f} learned tokens/s")
    speed = {g: sum(r[0] for r in results[g]) / sum(r[1] for r in results[g]) for g in results}
    print(f"--group-by-length: {speed[True] / speed[False]:.2f}x the learned tokens per second")
