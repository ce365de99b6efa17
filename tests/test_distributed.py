"""Acceptance tests of `torchrun --nproc_per_node 2 tulu.py sft|dpo`, two processes on
the CPU (gloo): each step's loss, gradient norm and token count, and the files written,
equal those of one process with the same global batch (batch-size x grad-accum x
ranks) within 1e-4 relative. qlora trains under DDP, full under FSDP2; DPO takes its
reference from switched-off adapters (DDP) or caches it data-parallel (FSDP2); a
SIGTERM that reaches one rank stops both after the same step, and the run resumes under
torchrun and in one process; errors that only several processes have end every rank
with one line.

The data are 10 examples and the global batch 8 (4 for DPO), so an epoch ends with a
short step of one micro-batch, which both ranks run (DistributedSampler's padding): a
repeated micro-batch counts twice, so the step's loss, gradient and rewards (means) are
still one process's, while the tokens it reports are twice one process's.
torchrun is started as `python -m torch.distributed.run --standalone` (a free port) on
tests/dist_worker.py, which runs tulu's command line and can inject a fault on one rank.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import llama
import lora
import tulu
from machinery import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HF_TINY = os.path.join(HERE, "fixtures", "cli", "hf_tiny")
WORKER = os.path.join(HERE, "dist_worker.py")
SMALL = ["--model", HF_TINY, "--max-seq-length", "128", "--lora-r", "8", "--lora-dropout", "0", "--seed", "0",
         "--batch-size", "2"]

GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
pytestmark = pytest.mark.skipif(not GLOO, reason="torch.distributed with gloo is not available here")


def torchrun(*argv, **fault):
    """`torchrun --nproc_per_node 2 tulu.py ARGV` (through tests/dist_worker.py); fault:
    TULU_TEST_* variables for one rank. Output decoded; a hang fails by timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in fault.items()}}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER]
    p = subprocess.run(cmd + [str(a) for a in argv], cwd=ROOT, env=env, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(), p.stderr.decode())


def one_process(*argv):
    tulu.main([str(a) for a in argv])


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out):
    name = "adapter_model.safetensors" if os.path.exists(os.path.join(out, "adapter_model.safetensors")) \
        else "model.safetensors"
    return load_file(os.path.join(out, name))


def rel_close(a, b, rel=1e-4):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def assert_same_outputs(two, one, method):
    """The output folders load, and compute the same logits (within 1e-4 of the largest):
    full models as they are, adapters over the NF4 base."""
    if method == "full":
        got, want = logits(llama.load_model(two, torch.float32)), logits(llama.load_model(one, torch.float32))
    else:
        base = lambda: llama.load_model(HF_TINY, torch.float32, quantize="nf4")
        a, b = base(), base()
        lora.load_adapter(a, two)
        lora.load_adapter(b, one)
        got, want = logits(a), logits(b)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def assert_same_run(two, one, steps, short=None):
    """metrics.jsonl has one row per step, each with one process's loss, gradient norm and
    tokens (twice them on the step `short`, whose one micro-batch both ranks run); the
    weights written are one process's, within 1e-4 relative (per tensor)."""
    rows, want = metrics(two), metrics(one)
    assert [r["step"] for r in rows] == [r["step"] for r in want] == list(range(1, steps + 1))
    for r, w in zip(rows, want):
        assert r["tokens"] == w["tokens"] * (2 if r["step"] == short else 1), r["step"]
        for k in [k for k in w if k == "loss" or k == "grad_norm" or k.startswith("rewards/")]:
            assert rel_close(r[k], w[k]), (r["step"], k, r[k], w[k])
    a, b = weights(two), weights(one)
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].dtype == b[k].dtype, k
        # written in the base's dtype: equal master weights may round to neighbouring
        # bf16 values, one bf16 step apart (2^-7 of the value: 8 significant bits)
        ulp = 2.0**-7 * b[k].float().abs() if b[k].dtype == torch.bfloat16 else 0
        assert ((a[k].float() - b[k].float()).abs() <= 1e-4 * b[k].float().abs().max() + ulp).all(), k


def assert_shards_are_rows(shards, model):
    """Each rank held (tests/dist_worker.py's TULU_TEST_SHARDS) of every weight of `model` (one
    process's, loaded whole) the rows torch.chunk gives it, as FSDP cuts them: NF4's codes by
    blocks of 64 weights (a row of 32 bytes) and their scales' codes, the same bytes; the scales'
    own scales whole. The adapters, drawn from the run's seed, its losses check."""
    held = [load_file(shards / f"rank{rank}.safetensors") for rank in range(2)]
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if ".lora_" in name:
            continue
        t = t.view(-1, 32) if name.endswith(".packed") else t
        for rank in range(2):
            want = t if name.endswith(("nested_absmax", "nested_offset")) else t.chunk(2)[rank]
            assert held[rank][name].dtype == want.dtype and torch.equal(held[rank][name], want), (name, rank)
    return [sum(t.nbytes for t in h.values()) for h in held]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    for name, src in (("sft.jsonl", "sft_train.jsonl"), ("prefs.jsonl", "prefs_train.jsonl")):
        with open(os.path.join(ROOT, "data", src)) as f:
            (d / name).write_text("".join(next(f) for _ in range(10)))
    return d


def logits(model):
    with torch.no_grad():
        return model(torch.arange(3, 40).view(1, -1))


# -----------------------------------------------------------------------------
# sft: DDP (qlora) and FSDP2 (full) give one process's run


@pytest.mark.parametrize("n, world", [(5, 2), (1, 4), (8, 4), (3, 8)])
def test_deal_pads_as_distributed_sampler_does(n, world):
    """Rank r takes items r, r + N, ...; a list that N does not divide is first padded with
    its first items: torch's DistributedSampler (shuffle=False) gives each rank the same."""
    from torch.utils.data import DistributedSampler
    items = [f"micro-batch {i}" for i in range(n)]
    for rank in range(world):
        want = [items[i] for i in DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)]
        assert distributed.deal(items, distributed.Dist(rank, world)) == want


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_sft_under_torchrun_is_the_one_process_run(tmp_path, data, method):
    """2 ranks x 2 micro-batches of 2 = one process's 4 micro-batches of 2. Clipping at
    1.0 is active at every step (the norms are 2 to 7), so a rank clipping by its own
    gradient's norm would change the weights."""
    flags = ["sft", *SMALL, "--data", data / "sft.jsonl", "--method", method, "--max-steps", 3,
             "--lr", 1e-2 if method == "qlora" else 1e-3, "--max-grad-norm", 1.0]
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(*flags, "--grad-accum", 4, "--output", one)
    encodes, shards = tmp_path / "encodes", tmp_path / "shards"
    shards.mkdir()
    p = torchrun(*flags, "--grad-accum", 2, "--output", two, XDG_CACHE_HOME=tmp_path / "cache",
                 TULU_TEST_ENCODES=encodes, TULU_TEST_SHARDS=shards)
    assert p.returncode == 0, p.stderr
    if method == "full":  # FSDP2: each rank read its rows of the bf16 checkpoint, as float32
        assert_shards_are_rows(shards, llama.load_model(HF_TINY, torch.float32))
    assert encodes.read_text() == "0\n"  # rank 0 encodes the data; rank 1 reads what it cached
    assert_same_run(two, one, steps=3, short=2)  # 8 examples, then the epoch's last 2
    assert all(r["grad_norm"] > 1.0 for r in metrics(one))
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # rank 0 alone writes, the same files
    assert p.stdout.count("config: ") == 1 and p.stdout.count("wrote ") == 1  # and alone prints
    assert "global batch = batch-size x grad-accum x ranks = 2 x 2 x 2 = 8 examples a step" in p.stdout
    assert_same_outputs(two, one, method)


# -----------------------------------------------------------------------------
# dpo, Ctrl-C / SIGTERM and --resume


def dpo_flags(data, method, out, ranks):
    """One process: grad-accum 2; two ranks: 1. Global batch 4: steps of 4, 4, 2, then 4."""
    return ["dpo", *SMALL, "--data", data / "prefs.jsonl", "--method", method, "--max-steps", 4, "--lr", 1e-2,
            "--grad-accum", 2 // ranks, "--output", out]


def test_dpo_qlora_reference_with_adapters_off_under_ddp(tmp_path, data):
    """LoRA's reference is the model with its adapters switched off, through DDP's wrapper:
    rewards 0 and loss ln 2 at step 0, then one process's curve."""
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(*dpo_flags(data, "qlora", one, 1))
    p = torchrun(*dpo_flags(data, "qlora", two, 2))
    assert p.returncode == 0, p.stderr
    assert_same_run(two, one, steps=4, short=3)
    assert metrics(two)[0]["rewards/margin"] == 0 and metrics(two)[-1]["rewards/margin"] != 0


def test_dpo_full_interrupted_on_one_rank_then_resumed(tmp_path, data):
    """FSDP2, with the reference log-probs cached data-parallel before the first step.
    Rank 1 alone gets SIGTERM during step 2: both ranks finish step 2, write one
    checkpoint (the shards gathered to rank 0) and exit 130. --resume under torchrun, and
    onto one process (another world size, same global batch), continue one process's run."""
    one, two = tmp_path / "one", tmp_path / "two"
    one_process(*dpo_flags(data, "full", one, 1))
    p = torchrun(*dpo_flags(data, "full", two, 2), TULU_TEST_RANK=1, TULU_TEST_SIGTERM_AT=2)
    assert p.returncode != 0 and "exitcode  : 130" in p.stderr and no_traceback(p), p.stderr
    assert p.stderr.count(f"interrupted: 2 steps are saved in {two}/checkpoint") == 1
    with open(two / "checkpoint" / "trainer_state.json") as f:
        assert json.load(f)["step"] == 2
    assert len(metrics(two)) == 2
    moved = tmp_path / "moved"
    shutil.copytree(two, moved)
    p = torchrun(*dpo_flags(data, "full", two, 2), "--resume", two)
    assert p.returncode == 0, p.stderr
    assert_same_run(two, one, steps=4, short=3)
    one_process(*dpo_flags(data, "full", moved, 1), "--resume", moved)
    assert_same_run(moved, one, steps=4)


# -----------------------------------------------------------------------------
# Errors that only several processes have: every rank ends, one line, no hang


def error_lines(p, command):
    lines = p.stderr.replace("\r", "\n").split("\n")
    return [line for line in lines if line.startswith(f"tulu {command}: error: ")]


def no_traceback(p):
    """No rank printed a traceback of ours, or was killed for not ending (SIGKILL). (torchrun
    itself reports a rank's non-zero status with a traceback of its own, and may stop the
    others with SIGTERM once the first has ended: they have all done their work by then.)"""
    ours = re.search(r'(tulu|dist_worker|machinery/\w+)\.py", line', p.stderr)
    return not ours and "(SIGKILL)" not in p.stderr


def test_a_rank_without_its_data_ends_every_rank_with_one_line(tmp_path, data):
    p = torchrun("sft", *SMALL, "--data", data / "sft.jsonl", "--output", tmp_path / "out",
                 TULU_TEST_RANK=1, TULU_TEST_NO_DATA=1)
    missing = f"{data / 'sft.jsonl'}.missing"
    assert error_lines(p, "sft") == [f"tulu sft: error: {missing}: no such file (rank 1)"], p.stderr
    assert p.returncode != 0
    assert no_traceback(p), p.stderr


def test_resume_with_another_global_batch_is_one_line(tmp_path, data, monkeypatch):
    """A checkpoint of one process with batch 2 x 1 (stopped by SIGTERM after step 2 of 4);
    two ranks with the same flags make a global batch of 4: a different run, refused by
    every rank alike."""
    out = tmp_path / "out"
    flags = ["sft", *SMALL, "--data", data / "sft.jsonl", "--method", "qlora", "--max-steps", 4,
             "--grad-accum", 1]
    loss, calls = tulu.SFTTask.loss, []
    monkeypatch.setattr(tulu.SFTTask, "loss", lambda *a: (calls.append(1), len(calls) == 2 and os.kill(
        os.getpid(), signal.SIGTERM), loss(*a))[-1])
    with pytest.raises(SystemExit):
        one_process(*flags, "--output", out)
    p = torchrun(*flags, "--resume", out)
    assert error_lines(p, "sft") == [f"tulu sft: error: {out}/checkpoint: the checkpoint was made with other "
                                     "settings (global_batch: 2 -> 4)"], p.stderr
    assert p.returncode != 0
    assert no_traceback(p), p.stderr


def test_every_rank_decides_on_the_whole_step_loss_and_norm(tmp_path, data):
    """Rank 1 alone sees a non-finite loss at step 2 (its gradient stays finite): no rank
    applies step 2, since each decides on the loss and gradient norm of the whole step,
    summed over the ranks; deciding on its own part, rank 0 would apply it and the
    ranks' weights would part. The run then stops there, on every rank."""
    steps = tmp_path / "steps"
    p = torchrun("sft", *SMALL, "--data", data / "sft.jsonl", "--method", "full", "--max-steps", 3,
                 "--grad-accum", 1, "--output", tmp_path / "out", TULU_TEST_RANK=1, TULU_TEST_LOSS_INF_AT=2,
                 TULU_TEST_STEPS=steps)
    assert p.returncode != 0 and "step 2: the loss is inf" in p.stderr, p.stderr
    assert sorted(steps.read_text().split()) == ["0", "1"]  # step 1 on both ranks, step 2 on none
