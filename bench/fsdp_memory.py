"""Each rank's peak resident memory under `torchrun --nproc_per_node 2` (gloo, CPU) against
one process training the same global batch: issue 25's acceptance, on models too large for
the test suite. A benchmark, not a test: run it by hand (minutes on 2 cores).

    python bench/fsdp_memory.py [--dir /tmp/tulu_fsdp_bench] [--steps 2] [--models qlora full]

The first run writes two random bf16 Llamas there with llama.save_model (the tiny test
model's tokenizer, vocabulary 768: the decoder weights are nearly all the bytes):
- qlora: ~0.5B parameters, trained with `--method qlora --fsdp` (NF4 base sharded) and, as
  QLoRA's recipe, --gradient-checkpointing: without it the activations FSDP does not shard
  (each rank runs a whole micro-batch) are as large as the 4-bit weights at this size;
- full:  ~0.17B parameters, trained with `--method full` (FSDP2 always).
Each run is a fresh process (or two) running tulu's command line; at exit each reports its
peak resident memory (the kernel's VmHWM) above what it held once its imports were done and,
as tests/test_plan.py measures, a warm-up run of the same command on the tiny model had paged
in torch's code and one-time setup (~55 MiB a process, counted before as the run's own).
Printed: one process's, each rank's, their ratio (the issue's target: at most 0.65), and what
`tulu.py plan` says of both (it should be within 25%). Both
run with MALLOC_MMAP_THRESHOLD_=65536 (as tests/test_plan.py measures): glibc's threshold
otherwise rises to the largest block freed, and each all-gather's buffers, once freed, stay in
the heap as RSS (measured: 1.08x and 1.10x one process's peak, from fragmentation alone).
Losses are the test suite's business (tests/test_fsdp.py).
"""
import argparse
import atexit
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY = os.path.join(ROOT, "tests", "fixtures", "cli", "hf_tiny")
MODELS = {  # name: (config, tulu flags): 38 x 12.9M, 24 x 7.1M decoder parameters
    "qlora": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=38, num_attention_heads=16,
                   num_key_value_heads=16, head_dim=64),
              ["--method", "qlora", "--fsdp", "--lora-r", "8", "--gradient-checkpointing"]),
    "full": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=24, num_attention_heads=12,
                  num_key_value_heads=12, head_dim=64), ["--method", "full"]),
}


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def write_model(folder: str, overrides: dict):
    """A random bf16 Llama with the tiny model's tokenizer and config, but `overrides`."""
    import torch

    import llama
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(TINY, "config.json")) as f, open(os.path.join(folder, "config.json"), "w") as out:
        json.dump({**json.load(f), **overrides}, out)
    cfg = llama.LlamaConfig.from_json(os.path.join(folder, "config.json"))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = llama.Llama(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.to(torch.bfloat16)
    print(f"{folder}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    llama.save_model(model, folder)
    for name in os.listdir(TINY):
        if name not in ("config.json", "model.safetensors"):
            shutil.copyfile(os.path.join(TINY, name), os.path.join(folder, name))


def run(argv, ranks: int) -> list[int]:
    """Peak RSS above the post-import baseline, in MiB, of each process of `tulu.py ARGV` (one,
    or `ranks` under torchrun)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    me = [os.path.abspath(__file__), "worker"]
    cmd = [sys.executable, *me] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *me]
    p = subprocess.run(cmd + argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr[-3000:])
    return [int(line.split()[-1]) // 1024 for line in p.stderr.splitlines() if line.startswith("peak_above_kb")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/tulu_fsdp_bench")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    data = os.path.join(args.dir, "sft.jsonl")
    os.makedirs(args.dir, exist_ok=True)
    with open(os.path.join(ROOT, "data", "sft_train.jsonl")) as f, open(data, "w") as out:
        out.writelines(next(f) for _ in range(16))
    for name in args.models:
        overrides, flags = MODELS[name]
        folder = os.path.join(args.dir, name)
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            write_model(folder, overrides)
        common = ["sft", "--model", folder, "--data", data, "--device", "cpu", "--dtype", "fp32",
                  "--max-steps", str(args.steps), "--batch-size", "1", "--max-seq-length", "128",
                  "--save-minutes", "0", "--seed", "0", "--num-workers", "1", *flags]
        one = run(common + ["--grad-accum", "2", "--output", os.path.join(args.dir, f"out-{name}-1")], 1)[0]
        two = run(common + ["--grad-accum", "1", "--output", os.path.join(args.dir, f"out-{name}-2")], 2)
        plans = [planned(folder, [f for f in flags if f != "--fsdp"]), planned(folder, flags + ["--nproc", "2"])]
        print(f"{name}: one process {one} MiB; 2 ranks " + ", ".join(f"{m} MiB" for m in two)
              + f"; ratio {max(two) / one:.2f} (target <= 0.65); tulu.py plan: {plans[0]} MiB, {plans[1]} MiB"
              f" a rank", flush=True)


def planned(folder: str, flags: list) -> int:
    """`tulu.py plan`'s total for the same run, in MiB."""
    argv = ["plan", "--model", folder, "--device", "cpu", "--dtype", "fp32", "--batch-size", "1",
            "--max-seq-length", "128", "--json", *flags]
    p = subprocess.run([sys.executable, "tulu.py", *argv], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(p.stdout)["total_bytes"] // 2**20


def warm_up(main, argv: list):
    """The same command on the tiny model, one step, as one process: it pages in torch's code and
    one-time setup (the meta device alone takes ~30 MB), which are no part of the run's memory."""
    world, swap = os.environ.get("WORLD_SIZE", "1"), {"--model": TINY, "--max-steps": "1"}
    swap["--output"] = argv[argv.index("--output") + 1] + "-warm" + os.environ.get("RANK", "0")
    os.environ["WORLD_SIZE"] = "1"
    main([swap.get(prev, a) for prev, a in zip([None] + argv, argv)])
    os.environ["WORLD_SIZE"] = world
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # what glibc kept of it
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the resident memory now


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    import torch.distributed.fsdp  # noqa: F401  (what --fsdp imports)

    import tulu
    warm_up(tulu.main, sys.argv[2:])
    base = status_kb("VmRSS")
    atexit.register(lambda: print(f"peak_above_kb {status_kb('VmHWM') - base}", file=sys.stderr, flush=True))
    tulu.main(sys.argv[2:])
elif __name__ == "__main__":
    main()
