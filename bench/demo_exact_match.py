"""The demo, run as a new user runs it, from an empty cache: `python tulu.py sft`, then
`python tulu.py dpo`, each timed; then `tulu.py eval` on what they wrote:

- exact match (greedy) on the first 40 conversations of data/sft_heldout.jsonl, for the
  QLoRA SFT adapter of `tulu.py sft`, the full-SFT model that `tulu.py dpo` starts from,
  and that model with the DPO adapter;
- held-out loss and perplexity (data/sft_heldout.jsonl) and preference metrics
  (data/prefs_heldout.jsonl) of the same models.

    python bench/demo_exact_match.py            # about 6 minutes on 2 cores

The cache is a fresh temporary folder (XDG_CACHE_HOME), so the timings include
building the tiny default model and the demo SFT that DPO starts from, as on a new
machine. Nothing here is a test: the figures go to README.md.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import llama  # noqa: E402
import lora  # noqa: E402
import tulu  # noqa: E402
import machinery.evaluate  # noqa: E402
from machinery import checks  # noqa: E402


def run(*argv, env):
    """`python tulu.py ARGV` as a user types it; its wall time in seconds."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tulu.py"), *argv], env=env, cwd=work,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if p.returncode:
        sys.exit(f"tulu.py {' '.join(argv)} failed:\n{p.stdout[-3000:]}")
    return time.perf_counter() - t, p.stdout


def exact_match(model_dir, adapter=None, qlora=False):
    tok = llama.Tokenizer(checks.tokenizer_source(adapter, model_dir))
    model = llama.load_model(model_dir, torch.float32, quantize="nf4" if qlora else None)
    if adapter:
        lora.load_adapter(model, adapter)
    prompts, answers = tulu.demo_answers(model, tok, model_dir)
    return machinery.evaluate.exact_match(answers, [r for _, r in prompts])


def evaluate(data, model_dir, adapter=None, qlora=False, env=None):
    out = os.path.join(work, "eval.json")
    argv = ["eval", "--model", model_dir, "--data", data, "--output", out] + (["--adapter", adapter] * bool(adapter))
    run(*argv + ["--qlora"] * qlora, env=env)
    with open(out) as f:
        return json.load(f)


if __name__ == "__main__":
    work = tempfile.mkdtemp(prefix="tulu-demo-")
    env = {**os.environ, "XDG_CACHE_HOME": os.path.join(work, "cache")}
    os.environ.update(env)
    t_sft, _ = run("sft", env=env)
    t_dpo, printed = run("dpo", env=env)
    base = tulu.tiny_default()  # found in the fresh cache: what the runs built
    sft_full = tulu.tiny_sft()
    sft_qlora, dpo_adapter = os.path.join(work, "out", "sft-qlora"), os.path.join(work, "out", "dpo-qlora")
    heldout, prefs = (os.path.join(tulu.DATA, n) for n in ("sft_heldout.jsonl", "prefs_heldout.jsonl"))
    rows = [("tulu.py sft (QLoRA adapter)", base, sft_qlora, True),
            ("demo full SFT (DPO's start)", sft_full, None, False),
            ("tulu.py dpo (QLoRA adapter on it)", sft_full, dpo_adapter, True)]
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"`python tulu.py sft` from an empty cache: {t_sft:.0f} s; then `python tulu.py dpo` "
          f"(demo full SFT + DPO): {t_dpo:.0f} s")
    print("\n| model | exact match (first 40) | held-out loss | perplexity | pairs: rewards/accuracy | margin |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, model_dir, adapter, qlora in rows:
        em = exact_match(model_dir, adapter, qlora)
        loss = evaluate(heldout, model_dir, adapter, qlora, env)
        pref = evaluate(prefs, model_dir, adapter, qlora, env) if adapter and "dpo" in adapter else None
        pref_cells = f"{pref['rewards/accuracy']:.2f} | {pref['rewards/margin']:.3f}" if pref else "- | -"
        print(f"| {name} | {em:.3f} | {loss['loss']:.3f} | {loss['perplexity']:.2f} | {pref_cells} |")
    print("\nthe end of `tulu.py dpo`:" + printed[printed.find("\n> ", printed.rfind("\nwrote ")):])
