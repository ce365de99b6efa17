"""machinery/plan.py: a run's memory as arithmetic, held to the run itself.

- Parts counted exactly: the weights and what trains against the model tulu.build_policy
  builds (NF4 buffers included); layer_activations against the bytes autograd saves in a
  decoder layer (counted with saved_tensors_hooks) for each method, in float32 and under bf16
  autocast, with and without LoRA dropout and gradient checkpointing.
- The peak against measured runs: two steps of `tulu.py sft` on a random Llama of 13.7M
  parameters (16 layers), qlora and lora at 2 x 128 tokens (activations weigh most), full at
  1 x 64 (weights, gradients and AdamW states weigh most) in one process, and full on 2 gloo
  ranks under torchrun (FSDP2). Measured: the peak resident memory (VmHWM) up to the writing
  of the outputs, above the resident memory before the run; a warm-up run on the tiny model
  first pages in torch's code and one-time setup (the meta device alone takes ~30 MB). Within
  25%; where this was written qlora 1.04, lora 1.00, full 1.03, full on 2 ranks 1.14-1.16 (each
  rank holds ~18 MB more than the plan, the process group's and FSDP2's own; so did qlora
  and lora --fsdp, 1.16 and 1.12, measured once, not tests: their NF4 or frozen weights are too
  small here for the sharding to show). glibc keeps freed blocks under 32 MiB for reuse, which
  grows a CPU run's resident memory to ~2x its live tensors by the second step; the plan counts
  tensors, so the measured processes have glibc give back each freed block of 64 KiB or more
  (MALLOC_MMAP_THRESHOLD_), and what it kept of a run before the next (malloc_trim).
- On paper, the QLoRA paper's claim: LLaMA-65B QLoRA r=64 at batch 1 x 512 with gradient
  checkpointing fits one 48 GB GPU, where full fine-tuning needs over 780 GB.
- `tulu.py plan`: --json, and --device-memory with the largest batch that fits.

Run as a script (python tests/test_plan.py RUNS_JSON OUT, or under torchrun) this file is the
measured process: it runs each command line of RUNS_JSON and appends its peak to OUT.
"""
import contextlib
import ctypes
import gc
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llama  # noqa: E402
import tulu  # noqa: E402
from machinery import cli, outputs, plan  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HF_TINY = os.path.join(HERE, "fixtures", "cli", "hf_tiny")
MEASURED = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=16,
                num_attention_heads=4, num_key_value_heads=2)  # 13.7M parameters
SHAPES = {"qlora": (2, 128), "lora": (2, 128), "full": (1, 64)}  # (batch, length): what weighs most differs
R = 8
LLAMA_65B = llama.LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                              num_attention_heads=64)  # the QLoRA paper's largest model (LLaMA 1)
LINUX = os.path.exists("/proc/self/clear_refs")
GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()


# -----------------------------------------------------------------------------
# Parts counted exactly


def policy(tmp_path, method, dtype, dropout=0.1, checkpointing=False, layers=3):
    """tulu.build_policy's model for --method on a random Llama of `layers` layers, and its run config."""
    cfg = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / f"model{layers}"
    if not path.exists():
        llama.save_model(llama.Llama(cfg), str(path))
    args = tulu.TrainConfig(method=method, device="cpu", lora_r=R, lora_dropout=dropout,
                            gradient_checkpointing=checkpointing)
    args.dtype = dtype
    return tulu.build_policy(args, str(path)), args, cfg


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_and_what_trains_are_the_model_s(tmp_path, method, dtype):
    """NF4's packed codes and scales (4.127 bits a weight) included, LoRA's A and B not; AdamW's
    gradients and two states a trained parameter in float32."""
    model, _, cfg = policy(tmp_path, method, dtype)
    parts = plan.plan(cfg, method, 1, 16, R, c=dtype.itemsize, device="cpu")
    base = [t for t in [*model.parameters(), *model.buffers()] if method == "full" or not t.requires_grad]
    assert parts["weights"] == sum(t.nbytes for t in base)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert parts["gradients"] == 4 * trained and parts["optimizer"] == 8 * trained
    assert parts["adapters"] == (0 if method == "full" else 4 * trained)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_bnb_4bit_folder_plans_the_nf4_weights_it_loads(method, capsys):
    """lora on a bitsandbytes 4-bit folder trains over the NF4 layers it loads, not bf16 ones (AdamW
    unpaged: that is qlora's); full fine-tuning and --fsdp are one-line errors, as sft's."""
    folder = os.path.join(HERE, "fixtures", "bnb", "tiny-bnb-4bit")
    args = tulu.TrainConfig(method=method, device="cpu", lora_r=R, lora_dropout=0)
    args.dtype = torch.bfloat16
    model = tulu.build_policy(args, folder)
    cfg = llama.LlamaConfig.from_json(os.path.join(folder, "config.json"))
    parts = plan.plan(cfg, method, 1, 16, R, c=2, device="cpu")
    frozen = [t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad]
    assert parts["weights"] == sum(t.nbytes for t in frozen)
    paged = plan.plan(cfg, method, 1, 16, R, device="cuda")["optimizer"] == 0
    assert paged == (method == "qlora")
    for flags in (["--method", "full"], ["--method", method, "--fsdp", "--nproc", "2"]):
        with pytest.raises(SystemExit) as e:
            tulu.main(["plan", "--model", folder, *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and "4-bit folder" in err[0], err


def saved_bytes(model, args, ids):
    """Bytes autograd saves in one forward: each storage once, parameters and their casts
    (weights, not activations) left out."""
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        fn = t.grad_fn
        while type(fn).__name__ in ("TBackward0", "ViewBackward0"):  # W.t() of a Linear
            fn = fn.next_functions[0][0]
        cast = type(fn).__name__ == "ToCopyBackward0" and \
            type(fn.next_functions[0][0]).__name__ == "AccumulateGrad"
        if not cast and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cli.autocast(args):
        model(ids, labels=ids)
    return sum(seen.values())


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("method,dtype,dropout,checkpointing", [
    ("full", F32, 0, False), ("full", BF16, 0, False), ("full", F32, 0, True), ("full", BF16, 0, True),
    ("lora", F32, 0.1, False), ("lora", F32, 0, False), ("lora", BF16, 0.1, False), ("lora", BF16, 0, False),
    ("qlora", BF16, 0.1, False), ("qlora", BF16, 0.1, True)])
def test_layer_activations_are_what_autograd_saves(tmp_path, method, dtype, dropout, checkpointing):
    """One decoder layer's share, in plan() and in autograd: a 3-layer model's activations less
    a 2-layer one's (the first layer differs: under LoRA nothing before it needs a gradient).
    Under checkpointing, what a layer keeps is its input alone."""
    ids, c = torch.randint(0, 128, (2, 16)), dtype.itemsize
    saved, planned = [], []
    for layers in (3, 2):
        model, args, cfg = policy(tmp_path, method, dtype, dropout, checkpointing, layers)
        saved.append(saved_bytes(model, args, ids))
        parts = plan.plan(cfg, method, *ids.shape, R, dropout, checkpointing, c, device="cpu")
        planned.append(parts["activations"])
    assert saved[0] - saved[1] == planned[0] - planned[1]
    if checkpointing:  # the residual stream: float32 under full's master weights
        assert planned[0] - planned[1] == ids.numel() * cfg.hidden_size * (4 if method == "full" else c)


# -----------------------------------------------------------------------------
# The peak against measured runs


def status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measured_process(runs, out):
    """Warm up on the tiny model (as one process, on every rank), then run each command line,
    appending {"rank", "peak"} to `out`: the peak resident memory up to the writing of the
    outputs, above the resident memory before the run. (Writing them is no part of the plan:
    on a GPU it takes host memory, and under FSDP rank 0 gathers the whole model for it.)"""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    peaks, save = [], outputs.save_outputs
    outputs.save_outputs = lambda *a: (peaks.append(status_bytes("VmHWM")), save(*a))[1]
    os.environ["WORLD_SIZE"] = "1"
    data = runs[0][runs[0].index("--data") + 1]
    tulu.main(["sft", "--model", HF_TINY, "--data", data, "--output", f"{out}.warm{rank}", "--max-steps", "1",
               "--batch-size", "2", "--max-seq-length", "64", "--lora-r", "4", "--num-workers", "1"])
    os.environ["WORLD_SIZE"] = world
    for argv in runs:
        gc.collect()
        with contextlib.suppress(AttributeError):  # glibc gives back what it kept of the last run's
            ctypes.CDLL(None).malloc_trim(0)  # memory: no cheaper start for the next
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from the resident memory now
        before = status_bytes("VmRSS")
        tulu.main(argv)
        with open(out, "a") as f:
            f.write(json.dumps({"rank": rank, "peak": peaks[-1] - before}) + "\n")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """(the model folder, run): run(methods, nproc) runs `tulu.py sft` with each method in turn
    in one measured process (under torchrun: on each of nproc ranks) and returns the peaks, in
    the order written, and the process's stdout."""
    d = tmp_path_factory.mktemp("measured")
    with torch.device("meta"):
        model = llama.Llama(llama.LlamaConfig(**MEASURED))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    llama.save_model(model.to(torch.bfloat16), str(d / "model"))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(HF_TINY, name), d / "model")
    words, rng = ["alpha", "beta", "gamma", "river", "stone", "light", "cloud", "tree"], random.Random(0)
    with open(d / "data.jsonl", "w") as f:  # answers longer than any row: each is cut, nearly all learned
        for _ in range(4):
            answer = " ".join(rng.choice(words) for _ in range(600))
            f.write(json.dumps({"messages": [{"role": "user", "content": "go"},
                                             {"role": "assistant", "content": answer}]}) + "\n")

    def run(methods, nproc=1):
        runs = [["sft", "--model", d / "model", "--data", d / "data.jsonl", "--method", m, "--output",
                 d / f"out-{m}-{nproc}", "--batch-size", SHAPES[m][0], "--max-seq-length", SHAPES[m][1],
                 "--grad-accum", 1, "--max-steps", 2, "--lora-r", R, "--num-workers", 1] for m in methods]
        out = d / f"peaks-{nproc}.jsonl"
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] * (nproc > 1)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        argv = [sys.executable, *torchrun, __file__, json.dumps([list(map(str, r)) for r in runs]), str(out)]
        p = subprocess.run(argv, env=env, capture_output=True, timeout=300)
        assert p.returncode == 0, p.stderr.decode()[-3000:]
        with open(out) as f:
            return [json.loads(line)["peak"] for line in f], p.stdout.decode()
    return d / "model", run


def planned(model_dir, method, world=1):
    cfg = llama.LlamaConfig.from_json(os.path.join(model_dir, "config.json"))
    return plan.peak(plan.plan(cfg, method, *SHAPES[method], lora_r=R, dropout=0.1, c=4, device="cpu",
                               world=world, fsdp=world > 1))  # sft's defaults on a CPU: float32, dropout 0.1


@pytest.fixture(scope="module")
def one_process(measured):
    peaks, stdout = measured[1](list(SHAPES))
    return dict(zip(SHAPES, peaks)), stdout


@pytest.mark.skipif(not LINUX, reason="reads the peak from /proc/self/status")
@pytest.mark.parametrize("method", list(SHAPES))
def test_plan_is_within_25_percent_of_a_measured_run(measured, one_process, method):
    peaks, stdout = one_process
    want = planned(measured[0], method)
    assert abs(peaks[method] / want - 1) <= 0.25, (peaks[method] / 2**20, want / 2**20)
    assert f"memory plan: {want / 2**30:.2f} GiB per device at batch {SHAPES[method][0]}" in stdout  # sft's


@pytest.mark.skipif(not (LINUX and GLOO), reason="reads /proc/self/status; needs torch.distributed with gloo")
def test_plan_of_full_on_two_fsdp_ranks_is_within_25_percent_of_each_rank(measured):
    """Weights, gradients and AdamW states weigh most: a plan that did not shard them would be
    1.7x this one."""
    model_dir, run = measured
    peaks, _ = run(["full"], nproc=2)
    want = planned(model_dir, "full", world=2)
    assert len(peaks) == 2, peaks
    assert all(abs(p / want - 1) <= 0.25 for p in peaks), ([p / 2**20 for p in peaks], want / 2**20)


# -----------------------------------------------------------------------------
# On paper, and the command line


def test_65b_qlora_fits_one_48gb_gpu_on_paper():
    """QLoRA (arXiv 2305.14314, Sec. 1): finetuning LLaMA-65B needs "more than 780 GB" of GPU
    memory in 16 bits, and under 48 GB with QLoRA (r=64 on every linear layer, gradient
    checkpointing, paged AdamW). Here full fine-tuning keeps float32 master weights: more still."""
    qlora = plan.plan(LLAMA_65B, "qlora", rows=1, seq=512, lora_r=64, checkpointing=True)
    assert plan.peak(qlora) < 48 * 10**9
    assert plan.peak(plan.plan(LLAMA_65B, "full", rows=1, seq=512, checkpointing=True)) > 780 * 10**9


def test_plan_json_and_the_largest_batch_that_fits(capsys):
    tulu.main(["plan", "--model", HF_TINY, "--batch-size", "8", "--max-seq-length", "512", "--json"])
    got = json.loads(capsys.readouterr().out)
    cfg = llama.LlamaConfig.from_json(os.path.join(HF_TINY, "config.json"))
    peak = lambda rows: plan.peak(plan.plan(cfg, "qlora", rows, 512))  # noqa: E731
    assert got["total_bytes"] == peak(8) and got["fits"] is None
    assert sum(got["parts"].values()) >= got["total_bytes"] > 0
    for largest in (5, 1, 0):  # the device's memory halfway between the peaks of two batches
        memory = (peak(largest) + peak(largest + 1)) // 2 if largest else peak(1) // 2
        tulu.main(["plan", "--model", HF_TINY, "--batch-size", "8", "--max-seq-length", "512", "--json",
                   "--device-memory", f"{memory}B"])
        got = json.loads(capsys.readouterr().out)
        assert got["fits"] is False and got["largest_batch"] == largest
    tulu.main(["plan", "--model", HF_TINY, "--device-memory", "24GiB"])
    out = capsys.readouterr().out
    assert "fits in 24.00 GiB: yes" in out and " peak " in out


def test_device_memory_that_is_not_a_size_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        tulu.main(["plan", "--model", HF_TINY, "--device-memory", "lots"])
    assert e.value.code == 2 and "--device-memory: 'lots' is not a size" in capsys.readouterr().err
    assert plan.size("24GiB") == 24 * 2**30 and plan.size("48 GB") == 48 * 10**9


if __name__ == "__main__":
    measured_process(json.loads(sys.argv[1]), sys.argv[2])
