"""A bitsandbytes 4-bit folder against quantizing while loading: time and peak memory of
`tulu.py quantize` (streamed), of llama.load_model on the 4-bit folder it wrote, and of
load_model(..., quantize="nf4") on the bf16 checkpoint, measured in the same run. A
benchmark, not a test: run it by hand.

    python bench/bnb_folder.py [--dir /tmp/tulu_nf4_bench]

It uses bench/nf4_load_memory.py's random bf16 Llama of about 600 MB (written there on
the first run) and writes the 4-bit folder beside it (DIR-bnb-4bit). Each step runs in a
fresh subprocess that reports, above the RSS it held after imports and a warm-up, its peak RSS
(the kernel's VmHWM) and, for a load, the RSS once every weight has been read (a plain load
memory-maps the file: its weights count once used); and its wall and CPU seconds (CPU time is
the fairer comparison on a shared machine). The floor of a load is the 4-bit model's own bytes.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

from nf4_load_memory import CONFIG, status_kb, write_checkpoint, written_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def child(step: str, path: str, out: str):
    """Run one step and print what it cost, as one JSON line."""
    import torch
    import llama
    import nf4
    from machinery.quantize import quantize_folder
    nf4.quantize_nf4(torch.randn(64, 64).bfloat16())  # torch's one-time setup is not the checkpoint's
    cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    base, t, c = status_kb("VmRSS"), time.time(), cpu()
    if step == "quantize":
        quantize_folder(path, out)
        weights = []
    else:
        model = llama.load_model(out if step == "bnb" else path, quantize="nf4" if step == "nf4" else None)
        weights = list(model.state_dict().values())
    seconds, cpu_seconds, peak = time.time() - t, cpu() - c, (status_kb("VmHWM") - base) * 1024
    for v in weights:
        v.amax()  # read every weight once, as a first forward pass would
    used, model_bytes = (status_kb("VmRSS") - base) * 1024, sum(v.numel() * v.element_size() for v in weights)
    print(json.dumps(dict(peak=peak, used=used, seconds=seconds, cpu=cpu_seconds, model=model_bytes)))


def measure(step: str, path: str, out: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--dir", path, "--child", step]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split("\n")[-2])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/tulu_nf4_bench", help="the random checkpoint (written once)")
    ap.add_argument("--child", choices=["quantize", "bnb", "nf4"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = args.dir.rstrip("/") + "-bnb-4bit"
    if args.child:
        return child(args.child, args.dir, out)
    if not os.path.exists(os.path.join(args.dir, "config.json")) or written_config(args.dir) != CONFIG:
        print(f"writing a random bf16 Llama to {args.dir} ...")
        write_checkpoint(args.dir)
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if ".safetensors" in f)
    names = {"quantize": "quantize (writes the 4-bit folder)", "bnb": "load the 4-bit folder",
             "nf4": "load quantize=\"nf4\" (bf16 checkpoint)"}
    runs, ckpt, mib = {step: measure(step, args.dir, out) for step in names}, size(args.dir), 2**20
    print(f"checkpoint: {ckpt / mib:.0f} MiB of bf16 safetensors, its 4-bit folder {size(out) / mib:.0f} MiB")
    print(f"{'':38} {'peak RSS':>9} {'in use':>7} {'seconds':>8} {'CPU s':>7}   peak/ckpt")
    for step, r in runs.items():
        used = f"{r['used'] / mib:5.0f}Mi" if r["model"] else ""
        print(f"{names[step]:38} {r['peak'] / mib:7.0f}Mi {used:>7} {r['seconds']:8.2f} {r['cpu']:7.2f}   "
              f"{r['peak'] / ckpt:9.3f}")
    bnb, nf = runs["bnb"], runs["nf4"]
    print(f"4-bit folder / quantizing while loading: time {bnb['seconds'] / nf['seconds']:.2f} (CPU "
          f"{bnb['cpu'] / nf['cpu']:.2f}), peak RSS "
          f"{bnb['peak'] / nf['peak']:.2f}, in use {bnb['used'] / nf['used']:.2f};  floor (4-bit model / "
          f"checkpoint): {bnb['model'] / ckpt:.3f}")


if __name__ == "__main__":
    main()
