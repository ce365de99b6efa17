"""`torchrun --nproc_per_node 2 tulu.py sft|dpo --method qlora|lora --fsdp`: FSDP2 shards the
frozen base too (NF4 codes and scales, or bf16/fp32 weights), the adapters and AdamW's state.
Two processes on the CPU (gloo) give one process's run: each step's loss, gradient norm and
tokens within 1e-4 relative, and the adapter written (PEFT's format, rank 0 writing each
tensor as it is gathered) loads and computes what one process's computes. The memory this
saves is measured by bench/fsdp_memory.py, on models too large for the suite.
"""
import os

import pytest
import torch

import llama
import lora
from test_distributed import GLOO, HF_TINY, SMALL, assert_same_outputs, assert_same_run, data, dpo_flags, metrics  # noqa: F401
from test_distributed import one_process, torchrun

pytestmark = pytest.mark.skipif(not GLOO, reason="torch.distributed with gloo is not available on this platform")


def test_sft_qlora_fsdp_is_the_one_process_run(tmp_path, data):
    """2 ranks x 2 micro-batches of 2 = one process's 4 micro-batches of 2, clipping active."""
    flags = ["sft", *SMALL, "--data", data / "sft.jsonl", "--method", "qlora", "--max-steps", 3,
             "--lr", 1e-2, "--max-grad-norm", 1.0]
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(*flags, "--grad-accum", 4, "--output", one)
    held = tmp_path / "held"
    p = torchrun(*flags, "--grad-accum", 2, "--output", two, "--fsdp", TULU_TEST_HELD=held)
    assert p.returncode == 0, p.stderr
    assert "torchrun: 2 ranks, FSDP2" in p.stdout
    # each rank holds half of every weight (NF4 codes, their scales' codes, bf16 and the adapters)
    model = llama.load_model(HF_TINY, torch.float32, quantize="nf4")
    lora.add_lora(model, r=8)
    whole = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    assert [int(n) / whole for n in held.read_text().split()] == pytest.approx([0.5, 0.5], abs=0.02)
    assert_same_run(two, one, steps=3, short=2)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert_same_outputs(two, one, "qlora")  # the adapter loads, and computes one process's logits


def test_dpo_lora_fsdp_reference_with_adapters_off(tmp_path, data):
    """lora (a float32 base, sharded as it is): the reference is the sharded model with its
    adapters switched off, inside the step; rewards 0 at step 0, then one process's curve."""
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(*dpo_flags(data, "lora", one, 1))
    p = torchrun(*dpo_flags(data, "lora", two, 2), "--fsdp")
    assert p.returncode == 0, p.stderr
    assert "torchrun: 2 ranks, FSDP2" in p.stdout
    assert_same_run(two, one, steps=4, short=3)
    assert metrics(two)[0]["rewards/margin"] == 0 and metrics(two)[-1]["rewards/margin"] != 0
