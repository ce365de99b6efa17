"""bf16 as GPUs train: float32 master weights under bf16 autocast, on the CPU too.

A bf16 weight near 0.02 cannot move by less than ~6e-5 (8 significant bits), so an
AdamW step of lr 2e-5 (Tulu 2 SFT) or 5e-7 (DPO) applied to bf16 weights leaves most
of them where they were. With float32 master weights a bf16 run changes the weights an
fp32 run changes, and its losses differ from fp32's by bf16 rounding only.

The losses' tolerance: bf16 keeps 8 significant bits, so each matrix product's inputs
and output are rounded by at most 2^-9 relative; a token's log-probability is a
difference of logits of magnitude ~|loss|, and the rounding of its few terms stays
within a few bf16 steps: 4 x 2^-8 of the loss (measured: about 2^-9).

Also here: what the CUDA path does that a CPU can check (the GPU's random state on
resume, the rank's GPU, bf16 support).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import llama
import tulu
from machinery import cli, distributed, runs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HF_TINY = os.path.join(HERE, "fixtures", "cli", "hf_tiny")  # stored in bf16, as checkpoints ship
SMALL = ["--max-seq-length", "128", "--seed", "0", "--batch-size", "2", "--max-steps", "4"]
LOSS_TOL = 4 * 2.0**-8  # relative: a few bf16 steps (module docstring)


def first_lines(name, n, dst):
    with open(os.path.join(ROOT, "data", name)) as f:
        dst.write_text("".join(next(f) for _ in range(n)))
    return dst


@pytest.fixture(scope="module")
def fp32_base(tmp_path_factory):
    """hf_tiny written in float32: a base whose every weight change shows in the output."""
    out = tmp_path_factory.mktemp("fp32_base")
    llama.save_model(llama.load_model(HF_TINY, dtype=torch.float32), str(out))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(HF_TINY, name), "rb") as f:
            (out / name).write_bytes(f.read())
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"sft": first_lines("sft_train.jsonl", 8, d / "sft.jsonl"),
            "dpo": first_lines("prefs_train.jsonl", 8, d / "prefs.jsonl")}


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def changed_fraction(out, base):
    new, old = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(base, "model.safetensors"))
    assert new.keys() == old.keys()
    return sum(int((new[k] != old[k]).sum()) for k in new) / sum(v.numel() for v in new.values())


def assert_bf16_learns_what_fp32_learns(bf16, fp32, base, dtype=torch.float32):
    a, b = changed_fraction(bf16, base), changed_fraction(fp32, base)
    assert b > 0.5 and abs(a - b) <= 0.05 * b, (a, b)  # within 5% of fp32's
    for r, w in zip(metrics(bf16), metrics(fp32), strict=True):
        assert abs(r["loss"] - w["loss"]) <= LOSS_TOL * abs(w["loss"]), (r["step"], r["loss"], w["loss"])
    assert {t.dtype for t in load_file(os.path.join(bf16, "model.safetensors")).values()} == {dtype}
    with open(os.path.join(bf16, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("command, lr", [("sft", 2e-5), ("dpo", 5e-7)])
def test_full_bf16_changes_the_weights_fp32_changes(tmp_path, fp32_base, data, command, lr):
    """Tulu 2's full SFT and DPO learning rates: bf16 compute changes as many weights as
    fp32 (bf16 weights updated in place changed 11% at 2e-5, none at 5e-7), its losses
    are fp32's to bf16 rounding, and the output keeps the base's dtype (float32 here)."""
    outs = {}
    for dtype in ("bf16", "fp32"):
        outs[dtype] = tmp_path / dtype
        tulu.main([command, "--model", str(fp32_base), "--data", str(data[command]), "--method", "full",
                   "--dtype", dtype, "--lr", str(lr), "--output", str(outs[dtype]), *SMALL])
    assert_bf16_learns_what_fp32_learns(outs["bf16"], outs["fp32"], fp32_base)


def test_full_output_keeps_a_bf16_base_dtype(tmp_path, data):
    """A bf16 base gives a bf16 folder, whatever the run computed in."""
    for dtype in ("bf16", "fp32"):
        out = tmp_path / dtype
        tulu.main(["sft", "--model", HF_TINY, "--data", str(data["sft"]), "--method", "full", "--dtype", dtype,
                   "--lr", "1e-3", "--output", str(out), *SMALL])
        assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
        assert changed_fraction(out, HF_TINY) > 0.5


def test_bf16_trains_under_autocast_with_float32_master_weights(monkeypatch):
    """What trains is float32 (weights, gradients, AdamW state); its matrix products run
    in bf16 (autocast, on the CPU too); a frozen lora base stays bf16."""
    seen = []
    forward = llama.Llama.forward

    def spy(self, *a, **kw):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *a, **kw)
    monkeypatch.setattr(llama.Llama, "forward", spy)
    args = tulu.TrainConfig(model=HF_TINY, method="full", dtype="bf16").resolve(demo=False)
    model = tulu.build_policy(args, HF_TINY)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with cli.autocast(args):
        model(torch.tensor([[1, 5, 7]]))
    assert seen == [(True, torch.bfloat16)]
    args.method = "lora"
    model = tulu.build_policy(args, HF_TINY)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.parametrize("command, lr", [("sft", 2e-5), ("dpo", 5e-7)])
def test_torchrun_full_bf16_is_fsdp_with_float32_masters(tmp_path, fp32_base, data, command, lr):
    """Two ranks under FSDP2 (bf16 gathered weights, float32 shards and reductions) learn
    what one bf16 process learns, and write the base's dtype."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = [command, "--model", fp32_base, "--data", data[command], "--method", "full", "--dtype", "bf16",
             "--lr", lr, *SMALL]
    tulu.main([str(a) for a in flags + ["--grad-accum", "2", "--output", one]])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "dist_worker.py"), *map(str, flags + ["--grad-accum", "1", "--output", two])]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert_bf16_learns_what_fp32_learns(two, one, fp32_base)


# -----------------------------------------------------------------------------
# The CUDA path, as far as a CPU can check it


def test_set_rng_state_restores_this_gpu_only(monkeypatch):
    """A checkpoint keeps the CPU's random state and this process's GPU's: one saved on
    8 GPUs resumes on 4 (torch.cuda.set_rng_state_all would raise IndexError)."""
    gpus, set_on = 4, []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": set_on.append(s))

    def set_all(states):
        for i in range(len(states)):
            if i >= gpus:
                raise IndexError("list index out of range")
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([i], dtype=torch.uint8)
                                                                    for i in range(8)])
    state = runs.rng_state()
    assert len(state["cuda"]) == 1
    runs.set_rng_state(state)
    assert [int(s) for s in set_on] == [7]
    runs.set_rng_state({**state, "cuda": torch.cuda.get_rng_state_all()})  # a checkpoint of 8 GPUs
    assert [int(s) for s in set_on] == [7, 0]


@pytest.mark.parametrize("visible, local_rank, want", [(8, 3, 3), (1, 3, 0), (2, 3, 1)])
def test_rank_device_wraps_local_rank_over_the_visible_gpus(monkeypatch, visible, local_rank, want):
    """Slurm's per-task binding shows each task one GPU while LOCAL_RANK runs 0..7."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert distributed.rank_device(local_rank) == torch.device("cuda", want)


def test_device_and_dtype_fall_back_where_a_gpu_has_no_bf16(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: False)
    assert cli.device_and_dtype("cuda", "auto") == ("cuda", torch.float32)
    assert "no bf16" in capsys.readouterr().out
    with pytest.raises(llama.TuluError, match="--dtype bf16"):
        cli.device_and_dtype("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    assert cli.device_and_dtype("auto", "auto") == ("cuda", torch.bfloat16)
    assert cli.device_and_dtype("cpu", "auto") == ("cpu", torch.float32)
    assert cli.device_and_dtype("cpu", "bf16") == ("cpu", torch.bfloat16)
    assert "no bf16" not in capsys.readouterr().out
