"""Time and peak memory of one training step, ours against transformers (+ PEFT +
bitsandbytes for QLoRA) on the same checkpoint and batch, measured in the same
run. A benchmark, not a test: run it in a venv that has transformers, peft and
bitsandbytes.

    python bench/train_step.py [--method qlora|full] [--prompt 0.5] [--compile] [--steps 6] [--batch 4] [--seq 256]
                               [--layers 4] [--device cpu|cuda]

A random Llama (Llama 2's proportions, --layers decoder layers) is written by
transformers once. Each side then runs in a fresh subprocess, the two
alternating --rounds times:
- qlora: load the base in NF4 with double quantization and bf16 compute, LoRA
  r=16 (alpha 16, dropout 0.05) on all seven projections, paged AdamW (ours:
  PagedAdamW; theirs: bitsandbytes' PagedAdamW32bit where it runs, else torch's
  AdamW);
- full: float32 master weights computing in bf16 under autocast (tulu.py's
  --method full --dtype bf16, and Trainer's bf16=True on a float32 model), every
  weight trained by torch's fused AdamW (Trainer's default with torch >= 2.8);
then --steps optimiser steps on the same random batch, each side computing the
mean cross-entropy of the learned tokens its own way (ours as tulu.py's SFT
loss, model(ids, labels=...); theirs transformers' model(input_ids, labels=...).loss).
--compile runs ours through tulu.py's --compile (its first step, which
compiles, is not timed). --prompt F masks the first F of every row from the loss (label -100), as an SFT
prompt is. Printed per side: the first loss (equal up to bf16 rounding), the
median step time after the first, peak resident memory (CPU) or peak allocated
memory (CUDA); then ours divided by theirs (< 1: we are faster / smaller).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def shape(layers):
    return dict(vocab_size=32000, hidden_size=1024, intermediate_size=2752, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch(args, vocab):
    """Random token ids (B, T) and their labels: every token learned, or with --prompt F
    the first F of each row masked (-100) as an SFT prompt is."""
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, :int(args.prompt * args.seq)] = -100
    return ids.to(args.device), labels.to(args.device)


def training_step(loss_of, opt, ids_labels):
    """One optimiser step of the mean next-token cross-entropy of the learned tokens,
    each side computing it its own way (ours: tulu.py's SFT loss; theirs:
    transformers' loss from `labels`)."""

    def step():
        loss = loss_of(*ids_labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def peak(device):
    import resource
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast(forward, device):
    """forward run under bf16 autocast, as cli.autocast (tulu.py's loop) and Trainer's bf16=True do."""
    import torch

    def run(*a, **kw):
        with torch.autocast(device, dtype=torch.bfloat16):
            return forward(*a, **kw)
    return run


def ours(args, path):
    import torch
    import llama
    import lora
    from machinery import fast
    from nf4 import PagedAdamW
    torch.manual_seed(0)
    if args.method == "full":
        model = llama.load_model(path, dtype=torch.float32, device=args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        model.forward = autocast(model.forward, args.device)
    else:
        model = llama.load_model(path, dtype=torch.bfloat16, device=args.device, quantize="nf4")
        lora.add_lora(model, r=16, alpha=16, dropout=0.05)
        fast.use_fast_dropout(model)  # as tulu.build_policy
        opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    if args.compile:
        fast.compile_layers(model)
    def loss_of(ids, labels):  # as tulu.SFTTask.loss
        return -model(ids, labels=labels).sum() / (labels[:, 1:] != -100).sum()
    return training_step(loss_of, opt, batch(args, model.config.vocab_size))


def theirs(args, path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    torch.manual_seed(0)
    if args.method == "full":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=args.device)
        model.train()
        model.forward = autocast(model.forward, args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        return training_step(lambda ids, labels: model(input_ids=ids, labels=labels).loss, opt,
                             batch(args, model.config.vocab_size))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=q,
                                                 device_map=args.device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        import bitsandbytes as bnb
        opt = bnb.optim.PagedAdamW32bit(params, lr=1e-4)
    except Exception:
        opt = torch.optim.AdamW(params, lr=1e-4)
    return training_step(lambda ids, labels: model(input_ids=ids, labels=labels).loss, opt,
                         batch(args, model.config.vocab_size))


def child(args):
    """One side's run, in a fresh process: prints a JSON line."""
    import torch
    step = (ours if args.side == "ours" else theirs)(args, args.path)
    times, losses = [], []
    for _ in range(args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step())
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(json.dumps({"first_loss": losses[0], "step_s": statistics.median(times[1:]), "peak_mib": peak(args.device)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=["qlora", "full"], default="qlora")
    ap.add_argument("--compile", action="store_true", help="ours with tulu.py's --compile (torch.compile per layer)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each side (default %(default)s)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=float, default=0.0,
                    help="fraction of each row masked from the loss, as a prompt (default %(default)s: all learned)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.side:
        return child(args)
    from transformers import LlamaConfig, LlamaForCausalLM
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape(args.layers))).to(torch.bfloat16).save_pretrained(d)
        results = {"ours": [], "theirs": []}
        for _ in range(args.rounds):
            for side in ("ours", "theirs"):
                cmd = [sys.executable, __file__, "--side", side, "--path", d, "--device", args.device,
                       "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
                       "--prompt", str(args.prompt), "--method", args.method] + ["--compile"] * args.compile
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results[side].append(json.loads(out.strip().splitlines()[-1]))
    what = ("LoRA r=16 on all projections, NF4 + double quant, bf16 compute" if args.method == "qlora"
            else "full fine-tuning, float32 masters + bf16 autocast, AdamW")
    print(f"{args.device}, {torch.get_num_threads()} threads; {args.layers} layers of hidden 1024, batch "
          f"{args.batch}x{args.seq} with {args.prompt:.0%} of each row a prompt; {what}")
    best = {s: {k: min(r[k] for r in rs) if k != "first_loss" else rs[0][k] for k in rs[0]}
            for s, rs in results.items()}
    for side, r in best.items():
        print(f"{side:7s} first loss {r['first_loss']:.4f}, step {r['step_s'] * 1000:.0f} ms, peak {r['peak_mib']:.0f} MiB")
    print(f"ratio ours/theirs: step time {best['ours']['step_s'] / best['theirs']['step_s']:.2f}, "
          f"peak memory {best['ours']['peak_mib'] / best['theirs']['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
