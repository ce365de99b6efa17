"""`torchrun --nproc_per_node 2 tulu.py sft|dpo --method qlora|lora --fsdp`: FSDP2 shards the
frozen base too (NF4 codes and scales, or bf16/fp32 weights), the adapters and AdamW's state.
Two processes on the CPU (gloo) give one process's run: each step's loss, gradient norm and
tokens within 1e-4 relative, and the adapter written (PEFT's format, rank 0 writing each
tensor as it is gathered) loads and computes what one process's computes. Each rank reads
only its rows of the checkpoint: its shards are one process's weights' rows, byte for byte
(NF4 quantized per rank). The memory this saves is measured by bench/fsdp_memory.py, on
models too large for the suite.
"""
import os

import pytest
import torch

import llama
import lora
from test_distributed import data  # noqa: F401  (a fixture)
from test_distributed import (GLOO, HF_TINY, SMALL, assert_same_outputs, assert_same_run,
                              assert_shards_are_rows, dpo_flags, error_lines, metrics, no_traceback,
                              one_process, torchrun)

pytestmark = pytest.mark.skipif(not GLOO, reason="torch.distributed with gloo is not available here")


def test_sft_qlora_fsdp_is_the_one_process_run(tmp_path, data):
    """2 ranks x 2 micro-batches of 2 = one process's 4 micro-batches of 2, clipping active; in
    backward each rank holds one decoder layer gathered at a time."""
    flags = ["sft", *SMALL, "--data", data / "sft.jsonl", "--method", "qlora", "--max-steps", 3,
             "--lr", 1e-2, "--max-grad-norm", 1.0]
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(*flags, "--grad-accum", 4, "--output", one)
    shards = tmp_path / "shards"
    shards.mkdir()
    p = torchrun(*flags, "--grad-accum", 2, "--output", two, "--fsdp", TULU_TEST_SHARDS=shards,
                 TULU_TEST_GATHERED=tmp_path / "events")
    assert p.returncode == 0, p.stderr
    assert "torchrun: 2 ranks, FSDP2" in p.stdout
    # on the CPU, backward gathers one layer at a time: FSDP's prefetching of the next would only
    # hold it longer (gloo's all-gathers overlap nothing)
    ahead, gathers, layers = [], 0, 0
    for event in " ".join((tmp_path / f"events{rank}").read_text() for rank in (0, 1)).split():
        gathers, layers = (0, 0) if event == "L" else (gathers + (event == "G"), layers + (event == "B"))
        if event == "B":  # gathered since backward began: the root's lm_head, then one a layer
            ahead.append(gathers - layers)
    assert ahead and set(ahead) == {1}, ahead
    # each rank read and quantized its half of every weight: one process's NF4 bytes, half each
    model = llama.load_model(HF_TINY, torch.float32, quantize="nf4")
    lora.add_lora(model, r=8)
    whole = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    assert [n / whole for n in assert_shards_are_rows(shards, model)] == pytest.approx([0.5, 0.5], abs=0.02)
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


def test_lora_fsdp_ranks_read_their_rows_in_bf16(tmp_path, data):
    """--dtype bf16: each rank's shards of the frozen base are one process's bf16 weights' rows."""
    shards = tmp_path / "shards"
    shards.mkdir()
    p = torchrun("sft", *SMALL, "--data", data / "sft.jsonl", "--method", "lora", "--fsdp", "--dtype", "bf16",
                 "--max-steps", 1, "--output", tmp_path / "out", TULU_TEST_SHARDS=shards)
    assert p.returncode == 0, p.stderr
    model = llama.load_model(HF_TINY, torch.bfloat16)
    lora.add_lora(model, r=8)
    assert_shards_are_rows(shards, model)


def test_a_non_finite_shard_on_one_rank_ends_every_rank_with_one_line(tmp_path, data):
    """A weight overflows in rank 1's shard alone: every rank refuses the checkpoint (each rank's
    verdict is all-reduced), where rank 0 would wait forever for rank 1 in the save's gathers."""
    p = torchrun("sft", *SMALL, "--data", data / "sft.jsonl", "--method", "full", "--max-steps", 3,
                 "--save-every", 1, "--output", tmp_path / "out", TULU_TEST_RANK=1, TULU_TEST_NAN_WEIGHT=1)
    assert p.returncode != 0 and no_traceback(p), p.stderr
    assert error_lines(p, "sft") == ["tulu sft: error: lm_head.weight holds non-finite values: checkpoint "
                                     "not written; try a lower --lr or --max-grad-norm"]
