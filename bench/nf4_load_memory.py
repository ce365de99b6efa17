"""Peak memory of loading a checkpoint with llama.load_model(..., quantize="nf4"),
against the checkpoint's size and against a plain bf16 load measured in the same
run. A benchmark, not a test: run it by hand.

    python bench/nf4_load_memory.py [--dir /tmp/tulu_nf4_bench]

The first run writes a random bf16 Llama of about 600 MB there with
llama.save_model (Llama-2-7B's proportions: embeddings and lm_head a small
share of the weights). Each load runs in a fresh subprocess that reports, above
the RSS it held after imports and a warm-up:
- peak RSS during the load (the kernel's VmHWM) and peak anonymous memory
  (sampled every millisecond);
- RSS once every weight has been read (as a first forward pass reads them): a
  plain load memory-maps the file, so its weights count only once they are used.
A third run repeats the nf4 load with MALLOC_MMAP_THRESHOLD_=65536, which makes
glibc give large freed blocks back at once, to show the allocator's share.
The last line also gives the floor: the loaded nf4 model's own bytes (4-bit
decoder weights, bf16 embeddings, lm_head and norms) over the checkpoint's, 0.29
here as for Llama-2-7B (embeddings and lm_head 4% of the weights; at 8%, as this
bench had until 2026-11, it is 0.32). No load can peak below it.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# ~296M parameters, 592 MB in bf16; embeddings and lm_head are 4.3% of them (3.9% in Llama-2-7B)
CONFIG = dict(vocab_size=4096, hidden_size=1536, intermediate_size=4096, num_hidden_layers=10,
              num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048)


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def write_checkpoint(path: str):
    import torch
    import llama
    torch.manual_seed(0)
    with torch.device("meta"):
        model = llama.Llama(llama.LlamaConfig(**CONFIG))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    llama.save_model(model, path)


def child(path: str, quantize: str | None):
    """Load once and print what it cost, as one JSON line."""
    import torch
    import llama
    import nf4
    # torch's one-time setup (the meta device, first kernels: ~70 MB) is not the checkpoint's
    with torch.device("meta"):
        llama.Llama(llama.LlamaConfig(vocab_size=8, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4))
    nf4.quantize_nf4(torch.randn(64, 64).bfloat16())
    base_rss, peak_anon, done = status_kb("VmRSS"), [status_kb("RssAnon")], threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status_kb("RssAnon"))
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    base_anon = peak_anon[0]
    sampler.start()
    t = time.time()
    model = llama.load_model(path, dtype=torch.bfloat16, quantize=quantize)
    seconds = time.time() - t
    done.set()
    sampler.join()
    load_peak = status_kb("VmHWM") - base_rss
    for v in model.state_dict().values():
        v.amax()  # read every weight once, as a first forward pass would
    print(json.dumps(dict(peak=load_peak * 1024, peak_anon=(peak_anon[0] - base_anon) * 1024,
                          used=(status_kb("VmRSS") - base_rss) * 1024, seconds=seconds,
                          model=sum(v.numel() * v.element_size() for v in model.state_dict().values()))))


def measure(path: str, quantize: str | None, env: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--dir", path, "--child", quantize or "none"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout
    return json.loads(out.strip().splitlines()[-1])


def written_config(path):
    """The CONFIG fields of the checkpoint already in `path` (another CONFIG: write it again)."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return {k: cfg.get(k) for k in CONFIG}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/tulu_nf4_bench", help="where the random checkpoint is (written once)")
    ap.add_argument("--child", choices=["none", "nf4"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.dir, None if args.child == "none" else args.child)
    if not os.path.exists(os.path.join(args.dir, "config.json")) or written_config(args.dir) != CONFIG:
        print(f"writing a random bf16 Llama to {args.dir} ...")
        write_checkpoint(args.dir)
    ckpt = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir) if f.endswith(".safetensors"))
    mib = 2**20
    print(f"checkpoint: {ckpt / mib:.0f} MiB of bf16 safetensors, {CONFIG}")
    runs = {"bf16": measure(args.dir, None, {}), "nf4": measure(args.dir, "nf4", {}),
            # glibc keeps freed blocks for reuse; with this, large ones go back to the system at once
            "nf4 *": measure(args.dir, "nf4", {"MALLOC_MMAP_THRESHOLD_": "65536"})}
    print(f"{'load':6} {'peak RSS':>9} {'peak anon':>10} {'RSS in use':>11} {'model':>7} {'seconds':>8}"
          f"   peak/ckpt  in use/ckpt")
    for name, r in runs.items():
        print(f"{name:6} {r['peak'] / mib:7.0f}Mi {r['peak_anon'] / mib:8.0f}Mi {r['used'] / mib:9.0f}Mi"
              f" {r['model'] / mib:5.0f}Mi {r['seconds']:8.1f}   {r['peak'] / ckpt:9.3f}  {r['used'] / ckpt:11.3f}")
    nf, bf = runs["nf4"], runs["bf16"]
    print("* with MALLOC_MMAP_THRESHOLD_=65536.  'RSS in use': after reading every weight once.")
    print(f"nf4 load peak RSS / checkpoint: {nf['peak'] / ckpt:.3f};  nf4 load peak RSS / bf16 model in use: "
          f"{nf['peak'] / bf['used']:.2f};  nf4 / bf16 RSS in use: {nf['used'] / bf['used']:.2f};  "
          f"floor (nf4 model / checkpoint): {nf['model'] / ckpt:.3f}")


if __name__ == "__main__":
    main()
