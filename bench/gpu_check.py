"""What this project claims on CUDA, checked on one GPU in one command (meant to take under 8 minutes):

    python bench/gpu_check.py [--quick] [--keep DIR]  # on a CUDA machine; elsewhere it says so and exits 0
    python bench/gpu_check.py --only 3 6               # some of the checks below
    python bench/gpu_check.py --cpu-dry-run            # the same code paths on the CPU, for development

 0. The tiny default models that `sft` and `dpo` start from are built (once, cached; the dry run trains
    tests/fixtures/cli/hf_tiny instead, with small batches).
 1. NF4 bytes quantized on the GPU equal the CPU's (packed, absmax, nested_*), bit for bit.
 2. Linear4bit's forward and backward under bf16 autocast equal F.linear on the dequantized weight.
 3. A QLoRA layer's training step (LoRALinear over Linear4bit, PagedAdamW) makes no host sync.
 4. machinery.fast.keep_mask keeps 1 - p of 10M elements, within 5 standard deviations.
 5. llama.label_logps equals reference_label_logps, values and gradients, fp32 and bf16 autocast.
 6. `tulu.py sft` stopped by SIGTERM after its step-10 checkpoint, then --resume'd: the loss curve
    (metrics.jsonl) equals an uninterrupted run's.
 7. `--compile --lora-dropout 0.1` trains; graph breaks and recompiles are counted (TORCH_LOGS).
 8. full SFT (lr 2e-5) and full DPO (lr 5e-7) in bf16, 5 steps: the fraction of weights that changed.
 9. bench/train_step.py and bench/generate_speed.py on the device, against transformers (+ PEFT +
    bitsandbytes) where installed: their last lines.
10. `tulu.py plan` against the peak memory of sft (qlora, lora, full) on a random 0.3B Llama: within 25%.
Each check runs on its own (one failing does not stop the rest); one table is printed at the end, and
the exit status is 1 when any check failed or raised. Subprocesses (this Python, each with a timeout)
write their logs and outputs to a temp folder, kept and named when something failed (or under --keep).
"""
import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_TINY = os.path.join(ROOT, "tests", "fixtures", "cli", "hf_tiny")
NO_CUDA = "no CUDA device: nothing to check (run this on a GPU machine)"
CHECKS = []  # (name, function) in order; each returns (True, False, None = skipped or "info", figure)


def check(name):
    def register(fn):
        CHECKS.append((name, fn))
        return fn
    return register


def launch(ctx, name, argv, env=None):
    log = os.path.join(ctx.tmp, f"{name}.log")
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}), log


def finish(proc, log, timeout):
    """Wait for proc; (exit status, its output). A run past `timeout` is killed and raises."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{log}: killed after {timeout} s: {tail(read(log))}") from None
    return proc.returncode, read(log)


def run(ctx, name, argv, timeout, env=None):
    rc, text = finish(*launch(ctx, name, argv, env), timeout)
    if rc != 0:
        raise RuntimeError(f"{name} exited {rc}: {tail(text)}")
    return text


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def tail(text, n=1):
    lines = [s.strip() for s in re.split(r"[\r\n]", text) if s.strip()]
    return " | ".join(lines[-n:])


def losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def tulu_run(ctx, command, out, *flags):
    """argv of a tulu.py run on the tiny default model (on the CPU: the test fixture, small batches)."""
    return ["tulu.py", command, *ctx.model, "--device", ctx.device, "--output", out, *flags]


@check("0 tiny default models")
def tiny_models(ctx):
    """Build (once, cached) the models that `sft` and `dpo` start from, and note where they are."""
    if ctx.dry:
        ctx.bases = {"sft": HF_TINY, "dpo": HF_TINY}
        return None, f"the dry run trains {os.path.relpath(HF_TINY, ROOT)} instead"
    code = ("import json, tulu\n"
            "print(json.dumps(dict(sft=tulu.tiny_default(), dpo=tulu.tiny_sft())))")
    text = run(ctx, "0-tiny", ["-c", code], 900)
    ctx.bases = json.loads(text.strip().splitlines()[-1])
    return True, f"base {ctx.bases['sft']}, DPO's start {ctx.bases['dpo']}"


@check("1 NF4 bytes: device == CPU")
def nf4_bytes(ctx):
    import torch
    from nf4 import quantize_nf4
    shape = (64, 1024) if ctx.dry else (4096, 4096)
    torch.manual_seed(0)
    diffs = []
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(shape, dtype=dtype)
        a, b = quantize_nf4(w), quantize_nf4(w.to(ctx.device))
        diffs += [f"{f} ({dtype})" for f in ("packed", "absmax", "nested_absmax", "nested_offset")
                  if not torch.equal(getattr(a, f), getattr(b, f).cpu())]
    same = "differ: " + ", ".join(diffs) if diffs else "packed, absmax, nested_* equal"
    return not diffs, f"{shape[0]}x{shape[1]} fp32 and bf16, {ctx.device} vs cpu: {same}"


@check("2 Linear4bit = F.linear, autocast bf16")
def linear4bit(ctx):
    import torch
    import torch.nn.functional as F
    from nf4 import Linear4bit
    torch.manual_seed(0)
    n = 256 if ctx.dry else 4096
    layer = Linear4bit.from_linear(torch.nn.Linear(n, n, bias=False, device=ctx.device))
    w = layer.dequantize(torch.bfloat16)
    x1 = torch.randn(2, 64, n, device=ctx.device, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    dy = torch.randn(2, 64, n, device=ctx.device)
    with torch.autocast(ctx.device, dtype=torch.bfloat16):
        y1, y2 = layer(x1), F.linear(x2, w)
    y1.backward(dy)
    y2.backward(dy.to(y2.dtype))
    dout, dgrad = (y1 - y2.float()).abs().max().item(), (x1.grad - x2.grad).abs().max().item()
    ulp = 2**-8 * max(y2.abs().max().item(), x2.grad.abs().max().item())  # a bf16 rounding of the largest
    verdict = "exact" if dout == dgrad == 0 else "within bf16 rounding" if max(dout, dgrad) <= ulp else "MORE"
    return verdict != "MORE", f"max |diff| forward {dout:.3g}, backward (dx) {dgrad:.3g}: {verdict}"


@check("3 QLoRA layer step: no host sync")
def no_sync(ctx):
    import torch
    from lora import LoRALinear
    from machinery.fast import use_fast_dropout
    from nf4 import Linear4bit, PagedAdamW
    if ctx.device != "cuda":
        return None, "CUDA only (torch.cuda.set_sync_debug_mode)"
    torch.manual_seed(0)
    layer = LoRALinear(Linear4bit.from_linear(torch.nn.Linear(1024, 1024, device="cuda")), 16, 16, 0.1)
    use_fast_dropout(layer)  # as tulu trains it
    opt = PagedAdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(4, 256, 1024, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layer(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # warm-up: the optimizer's pages move to the GPU once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as e:  # the message names the synchronizing call; the traceback's last line, where
        return False, f"{str(e).splitlines()[0]} (at {traceback.extract_tb(e.__traceback__)[-1].line})"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return True, "forward, backward and PagedAdamW step under set_sync_debug_mode('error'), after a warm-up"


@check("4 LoRA dropout keep rate")
def keep_rate(ctx):
    import torch
    from machinery.fast import keep_mask
    n, p = 10_000_000, 0.1
    torch.manual_seed(0)
    kept = keep_mask((n,), p, device=ctx.device).sum().item() / n
    z = (kept - (1 - p)) / math.sqrt(p * (1 - p) / n)
    return abs(z) < 5, f"kept {kept:.6f} of {n:,} (p={p}): {z:+.2f} standard deviations from {1 - p}"


def logps_and_grads(model, ids, labels, weights, fast, autocast):
    import torch
    import llama
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        lp = model(ids, labels=labels) if fast else llama.reference_label_logps(model(ids), labels)
    (lp * weights).sum().backward()
    return lp.detach(), [p.grad.clone() for p in model.parameters()]


@check("5 label_logps = reference")
def label_logps(ctx):
    import torch
    import llama
    torch.manual_seed(0)
    cfg = llama.LlamaConfig(vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = llama.Llama(cfg).to(ctx.device)
    for p in (p for p in model.parameters() if p.dim() == 2):
        torch.nn.init.normal_(p, 0.0, 0.1)
    ids = torch.randint(0, cfg.vocab_size, (3, 48), device=ctx.device)
    labels = ids.masked_fill(torch.arange(48, device=ctx.device) < 10, -100)  # a prompt
    weights = torch.randn(3, 47, device=ctx.device)
    figures, ok = [], True
    for name, autocast, tol_v, tol_g in (("fp32", False, 1e-5, 1e-4), ("bf16 autocast", True, 0.02, 0.05)):
        (v1, g1), (v2, g2) = (logps_and_grads(model, ids, labels, weights, fast, autocast) for fast in (1, 0))
        dv = (v1 - v2).abs().max().item()
        dg = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(g1, g2))
        ok &= dv <= tol_v and dg <= tol_g
        figures.append(f"{name}: values {dv:.2g} (<= {tol_v}), gradients {dg:.2g} relative (<= {tol_g})")
    return ok, "; ".join(figures)


@check("6 sft SIGTERM + --resume = one run")
def resume(ctx):
    flags = ["--method", "qlora", "--max-steps", "20", "--save-every", "10"]
    whole, stopped = os.path.join(ctx.tmp, "whole"), os.path.join(ctx.tmp, "stopped")
    run(ctx, "6-whole", tulu_run(ctx, "sft", whole, *flags), 600)
    argv = tulu_run(ctx, "sft", stopped, *flags)
    state = os.path.join(stopped, "checkpoint", "trainer_state.json")  # tulu.CHECKPOINT, tulu.STATE
    proc, log = launch(ctx, "6-stopped", argv)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not os.path.exists(state) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # still ours: proc.wait below reaps it
    rc, text = finish(proc, log, 120)
    if rc != 130:
        return False, f"the SIGTERM'd run exited {rc}, not 130 (interrupted): {tail(text)}"
    with open(state) as f:
        stopped_at = json.load(f)["step"]
    run(ctx, "6-resumed", argv + ["--resume", stopped], 600)
    a, b = losses(whole), losses(stopped)
    if a.keys() != b.keys():
        return False, f"steps differ: {sorted(a)} vs {sorted(b)}"
    before = max(abs(a[s] - b[s]) for s in a if s <= stopped_at)
    after = max(abs(a[s] - b[s]) for s in a if s > stopped_at)
    return after <= 1e-5, (f"stopped after step {stopped_at}; max |loss diff| vs the uninterrupted run: "
                           f"{after:.3g} after the resume (<= 1e-5), {before:.3g} before it")


@check("7 --compile --lora-dropout 0.1")
def compiled(ctx):
    steps, out = "2" if ctx.quick else "3", os.path.join(ctx.tmp, "compile")  # each recompile costs seconds
    argv = tulu_run(ctx, "sft", out, "--method", "qlora", "--compile", "--lora-dropout", "0.1",
                    "--max-steps", steps)
    text = run(ctx, "7-compile", argv, 600, env={"TORCH_LOGS": "graph_breaks,recompiles"})
    final = losses(out)
    ok = len(final) == int(steps) and all(math.isfinite(v) for v in final.values())
    return ok, f"{steps} steps, last loss {final[max(final)]:.4f}; {dynamo_summary(text)}"


def dynamo_summary(text):
    """Graph breaks by place, recompiles by their first failed guard, from TORCH_LOGS (torch 2.13's lines)."""
    from collections import Counter
    places = re.findall(r"\[__graph_breaks\] Graph break.*? at (\S+)", text)
    breaks = Counter(os.path.relpath(p, ROOT) for p in places)
    firsts = [re.search(r"- \d+/\d+: (.*)", e) for e in text.split("Recompiling function")[1:]]
    guards = Counter(re.sub(r"\s+#.*# (\S+).*", r" (\1)", m.group(1)) if m else "?" for m in firsts)
    top = lambda c: ", ".join(f"{k} x{n}" for k, n in c.most_common(3))
    return (f"{sum(breaks.values())} graph breaks ({top(breaks)}), "
            f"{sum(guards.values())} recompiles ({top(guards)})")


def changed_fraction(before_dir, after_dir):
    """(fraction of the weights that changed, tensors that changed, tensors) over the tensors both hold."""
    from safetensors.torch import load_file
    import llama
    load = lambda d: {k: v for f in llama.checkpoint_files(d) for k, v in load_file(f).items()}
    a, b = load(before_dir), load(after_dir)
    changed = [(a[k].to(b[k].dtype) != b[k]).sum().item() for k in a.keys() & b.keys()]
    total = sum(b[k].numel() for k in a.keys() & b.keys())
    return sum(changed) / total, sum(c > 0 for c in changed), len(changed)


def full_run(ctx, command, lr):
    out = os.path.join(ctx.tmp, f"{command}-full")
    run(ctx, f"8-{command}", tulu_run(ctx, command, out, "--method", "full", "--dtype", "bf16", "--lr", lr,
                                      "--max-steps", "5"), 600)
    if not ctx.bases:
        raise RuntimeError("the tiny default models were not built (check 0)")
    frac, tensors, of = changed_fraction(ctx.bases[command], out)
    # a figure, not a verdict, unless nothing moved: bf16 weights lose updates under half their rounding step
    figure = f"{frac:.2%} of the weights changed ({tensors} of {of} tensors), {ctx.bases[command]} -> {out}"
    return "info" if frac > 0 else False, figure


check("8a full SFT bf16 lr 2e-5: weights changed")(lambda ctx: full_run(ctx, "sft", "2e-5"))
check("8b full DPO bf16 lr 5e-7: weights changed")(lambda ctx: full_run(ctx, "dpo", "5e-7"))


def have(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


@check("9a bench/train_step.py")
def bench_train(ctx):
    if not have("transformers"):
        return None, "transformers is not installed: nothing to compare with"
    method = "qlora" if have("peft", "bitsandbytes") else "full"  # theirs needs PEFT + bitsandbytes for QLoRA
    steps = "4" if ctx.quick or ctx.dry else "6"
    text = run(ctx, "9-train_step", ["bench/train_step.py", "--device", ctx.device, "--method", method,
                                     "--rounds", "1", "--steps", steps], 600)
    return True, f"--method {method}: {tail(text, 3)}"


@check("9b bench/generate_speed.py")
def bench_generate(ctx):
    if not have("transformers"):
        return None, "transformers is not installed: nothing to compare with"
    quick = ["--repeats", "1", "--new-tokens", "32"] if ctx.quick or ctx.dry else []
    text = run(ctx, "9-generate_speed", ["bench/generate_speed.py", "--device", ctx.device, *quick], 600)
    return "identical tokens: False" not in text, tail(text, 2)


PEAK = ("import sys, torch, tulu\n"
        "rss = lambda k: next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(k))\n"
        "before = rss('VmRSS:')\n"
        "tulu.main(sys.argv[1:])\n"
        "cuda = sys.argv[sys.argv.index('--device') + 1] == 'cuda'\n"
        "print('PEAK', torch.cuda.max_memory_allocated() if cuda else rss('VmHWM:') - before)")


@check("10 tulu.py plan = measured peak")
def plan_peaks(ctx):
    """sft with each method on a random 0.3B Llama (the tiny model's tokenizer), every row full and
    learned: the peak the allocator saw (CUDA) against `tulu.py plan`'s total, within 25%. On the CPU
    (dry run, a smaller model) the peak is resident memory, torch's own setup included: a figure."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from fsdp_memory import write_model  # a random bf16 Llama with the tiny model's tokenizer
    shape = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6 if ctx.dry else 24,
                 num_attention_heads=16, num_key_value_heads=16, head_dim=64)
    model, data = os.path.join(ctx.tmp, "plan-model"), os.path.join(ctx.tmp, "plan-data.jsonl")
    write_model(model, shape)
    with open(data, "w") as f:  # answers longer than a row: each is cut, nearly all learned
        for i in range(8):
            answer = " ".join(["alpha", "river", "stone", "light"][(i + j) % 4] for j in range(900))
            f.write(json.dumps({"messages": [{"role": "user", "content": "go"},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    ratios = []
    for method in ("qlora", "lora", "full"):
        flags = ["--model", model, "--method", method, "--batch-size", "2", "--max-seq-length", "512",
                 "--gradient-checkpointing", "--lora-r", "16", "--device", ctx.device, "--dtype", "bf16"]
        text = run(ctx, f"10-{method}", ["-c", PEAK, "sft", *flags, "--data", data, "--max-steps", "2",
                                         "--output", os.path.join(ctx.tmp, f"plan-{method}")], 600)
        measured = int(text.split("PEAK")[-1])
        planned = json.loads(run(ctx, f"10-plan-{method}", ["tulu.py", "plan", *flags, "--json"], 60))
        ratios.append((method, measured / planned["total_bytes"]))
    figure = ", ".join(f"{m} {r:.2f}" for m, r in ratios) + " (measured / planned)"
    return ("info" if ctx.dry else all(abs(r - 1) <= 0.25 for _, r in ratios)), figure


def cuda_machine() -> bool:
    """Whether an NVIDIA driver is here, without importing torch."""
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def table(rows):
    w = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{a:<{w[0]}} | {b:<{w[1]}} | {c}" for a, b, c in rows)


def run_checks(ctx):
    """Each selected check in order, whatever the others did; the table's rows."""
    rows, start = [("check", "result", "figure")], time.monotonic()
    for name, fn in CHECKS:
        if ctx.only and not any(name.split()[0].startswith(n) for n in ctx.only):
            continue
        t = time.monotonic()
        print(f"[{t - start:4.0f} s] {name} ...", file=sys.stderr, flush=True)
        try:
            ok, figure = fn(ctx)
            result = {True: "pass", False: "FAIL", None: "skip"}.get(ok, ok)
        except Exception as e:  # noqa: BLE001: one check's failure is a row of the table
            result, figure = "error", f"{type(e).__name__}: {str(e)[-600:]}"
        rows.append((name, result, f"{figure} [{time.monotonic() - t:.0f} s]"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer compiled steps, benchmark steps and repeats")
    ap.add_argument("--cpu-dry-run", dest="dry", action="store_true",
                    help="the same checks on the CPU, small sizes, CUDA-only ones skipped")
    ap.add_argument("--only", nargs="+", metavar="N", help="run only these checks (numbers: 1 6 8a 9)")
    ap.add_argument("--keep", metavar="DIR", help="write logs and outputs under DIR and keep them "
                                                  "(default: a temp folder, removed unless a check failed)")
    ctx = ap.parse_args()
    if not ctx.dry and not cuda_machine():
        print(NO_CUDA)
        return 0
    sys.path.insert(0, ROOT)
    import torch
    if not ctx.dry and not torch.cuda.is_available():
        print(f"{NO_CUDA}\nan NVIDIA driver is here, but torch {torch.__version__} sees no CUDA device")
        return 3
    if ctx.only and any(n.startswith("8") for n in ctx.only):
        ctx.only.append("0")  # check 8 compares with the models that check 0 builds
    ctx.device, ctx.bases = "cpu" if ctx.dry else "cuda", None
    ctx.model = ["--model", HF_TINY, "--batch-size", "8", "--grad-accum", "1", "--max-seq-length", "128",
                 "--lora-r", "8"] if ctx.dry else []  # the dry run: the test fixture, no pretraining
    ctx.tmp, start = tempfile.mkdtemp(prefix="gpu_check-", dir=ctx.keep), time.monotonic()
    rows = run_checks(ctx)
    where = torch.cuda.get_device_name() if ctx.device == "cuda" else "CPU dry run"
    print(f"\n{where}, torch {torch.__version__}, {time.monotonic() - start:.0f} s in all\n{table(rows)}")
    failed = any(r[1] in ("FAIL", "error") for r in rows[1:])
    if failed or ctx.keep:
        print(f"logs and outputs in {ctx.tmp}")
    else:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
