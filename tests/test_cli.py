"""Acceptance tests of tulu.py's command line, run as a user runs it: `sft` and
`dpo` with each --method, micro-batches, Ctrl-C and --resume, bad input,
`merge`, `chat`, --help, and README's `python tulu.py sft` on the tiny default.

Golden files come from tests/make_fixtures.py (area "cli"): hf_tiny, a GQA
Llama that transformers wrote with the tiny tokenizer; two adapters our `sft`
wrote on it (qlora, lora), with the logits PEFT gives them on transformers'
model (fp32, and bitsandbytes NF4 for QLoRA). While transformers was at hand,
make_fixtures also checked that transformers loads what `sft --method full`
and `merge` write, with our logits. Everything else is an invariant written
out in the test: ln 2 at DPO's step 0, equal updates however a batch is split,
equal losses after --resume, logits of a fresh load.

Most tests call tulu.main in this process (fast); what a user sees when a
command fails, and commands exactly as typed, run `python tulu.py` itself.
"""
import dataclasses
import io
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import dpo
import llama
import lora
import tulu
from machinery import checks, data, demo, evaluate, outputs, runs
from machinery import cli as cli_module
from machinery.data import Examples, example_lengths

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = os.path.join(HERE, "fixtures", "cli")
HF_TINY = os.path.join(FIX, "hf_tiny")
SFT_ADAPTERS = {"qlora": os.path.join(FIX, "sft_qlora"), "lora": os.path.join(FIX, "sft_lora")}
TULU = os.path.join(ROOT, "tulu.py")
DATA = os.path.join(ROOT, "data")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EOS = 2  # the tiny tokenizer's </s>, also the padding id of the batches

# Runs on hf_tiny: micro-batches of short conversations, rank-8 adapters
SMALL = ["--model", HF_TINY, "--max-seq-length", "128", "--lora-r", "8", "--seed", "0"]
PRETRAIN_STEPS = 20   # the tiny default's pretraining in tests (demo.PRETRAIN: 2000 steps, ~90 s on 2 cores)
DEMO_SFT_STEPS = 40   # the demo SFT that `dpo` runs first (the demo recipe: 3 epochs, ~560 steps)


# -----------------------------------------------------------------------------
# Helpers and shared fixtures


def cli(*argv):
    tulu.main([str(a) for a in argv])


def run(*argv, cwd=None):
    """`python tulu.py ...` in a process of its own. Its output is read as bytes and
    decoded: text=True would translate the progress bars' "\\r" into new lines."""
    p = subprocess.run([sys.executable, TULU, *map(str, argv)], cwd=cwd or ROOT, capture_output=True, timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(), p.stderr.decode())


def first_lines(src, n, dst):
    with open(src) as f:
        lines = [next(f) for _ in range(n)]
    with open(dst, "w") as f:
        f.writelines(lines)
    return str(dst)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def trained_tensors(out):
    """The weights an output folder holds: the adapter's, or the whole model's."""
    name = ADAPTER_FILES[1] if os.path.exists(os.path.join(out, ADAPTER_FILES[1])) else "model.safetensors"
    return load_file(os.path.join(out, name))


def assert_close_tensors(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def assert_close_losses(rows_a, rows_b, atol):
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        assert abs(a["loss"] - b["loss"]) <= atol, (a["step"], a["loss"], b["loss"])


def tiny_model(nf4=False, adapter=None, path=HF_TINY):
    model = llama.load_model(path, dtype=torch.float32, quantize="nf4" if nf4 else None)
    if adapter:
        lora.load_adapter(model, adapter)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def same_bytes(a, b):
    with open(a, "rb") as f, open(b, "rb") as g:
        return f.read() == g.read()


def tulu_tokenizer(out):
    """An output's tokenizer is the base's, with the Tulu chat template in tokenizer_config.json."""
    config = {**llama.tokenizer_config(HF_TINY), "chat_template": tulu.chat_template(llama.Tokenizer(HF_TINY))}
    same = [same_bytes(os.path.join(out, n), os.path.join(HF_TINY, n)) for n in ("tokenizer.model", "special_tokens_map.json")]
    return llama.tokenizer_config(out) == config and all(same)


def visible_lines(stderr):
    """The lines a terminal shows: a progress bar redraws its line after "\\r"
    and a finished one (leave=False) blanks it."""
    lines = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line for line in lines if line.strip()]


def one_line_error(capsys, command, argv):
    """Run in-process; the command must exit 1 with exactly one line on stderr."""
    with pytest.raises(SystemExit) as e:
        cli(command, *argv)
    assert e.value.code == 1
    err = visible_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith(f"tulu {command}: error: "), err[0]
    return err[0]


@pytest.fixture(scope="module")
def ref():
    return load_file(os.path.join(FIX, "expected.safetensors"))


@pytest.fixture(scope="module")
def meta():
    with open(os.path.join(FIX, "meta.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
    return first_lines(os.path.join(DATA, "sft_train.jsonl"), 16, tmp_path_factory.mktemp("data") / "sft.jsonl")


@pytest.fixture(scope="session")
def prefs_data(tmp_path_factory):
    return first_lines(os.path.join(DATA, "prefs_train.jsonl"), 16, tmp_path_factory.mktemp("data") / "prefs.jsonl")


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """$XDG_CACHE_HOME for the session, in this process and in the `python tulu.py`
    processes it starts, so the tiny default is built once and never in ~/.cache."""
    d = tmp_path_factory.mktemp("xdg_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(d))
        yield d


def short_pretraining(steps):
    """tulu.train, but the tiny default's pretraining stops after `steps` steps.
    The cache key (TINY, PRETRAIN, data/) stays the real one, so a later
    `python tulu.py sft` finds the model in the cache, as on a user's second run."""
    train = tulu.train

    def wrapper(args, *rest, **kw):
        if args.command == "pretrain":
            args = dataclasses.replace(args, max_steps=steps)
        return train(args, *rest, **kw)
    return wrapper


@pytest.fixture(scope="session")
def tiny_default(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tulu, "train", short_pretraining(PRETRAIN_STEPS))
        return tulu.tiny_default()


# -----------------------------------------------------------------------------
# The fixtures: our sft outputs, read by PEFT (make_fixtures) and by us


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_sft_fixture_adapters_give_peft_logits(ref, method):
    """The adapters our sft wrote, loaded by us, give PEFT's logits: on the NF4
    base for QLoRA (what training saw), and on the plain base (what PEFT users
    without bitsandbytes, and `merge` without --qlora, compute)."""
    ids = ref["input_ids"]
    cases = [(False, "lora.peft")] if method == "lora" else [(True, "qlora.peft_nf4"), (False, "qlora.peft_plain")]
    for nf4, key in cases:
        got = logits(tiny_model(nf4, SFT_ADAPTERS[method]), ids)
        assert torch.allclose(got, ref[key], atol=1e-4, rtol=0), key
        assert not torch.allclose(logits(tiny_model(nf4), ids), ref[key], atol=1e-3), "the adapter changes nothing"


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_sft_reproduces_the_fixture_run(tmp_path, monkeypatch, sft_data, ref, meta, method):
    """The same command as make_fixtures ran gives the same adapter files, so
    PEFT reads them with the stored logits: `sft` output loads in PEFT."""
    monkeypatch.chdir(ROOT)  # the fixture ran from the root with a relative --model
    out = tmp_path / "out"
    data = first_lines(os.path.join(DATA, "sft_train.jsonl"), meta["data_lines"], tmp_path / "sft.jsonl")
    model = os.path.relpath(HF_TINY, ROOT)
    cli("sft", "--model", model, "--data", data, "--method", method, "--output", out, *meta["sft_flags"])
    with open(out / "adapter_config.json") as f, open(os.path.join(SFT_ADAPTERS[method], "adapter_config.json")) as g:
        assert json.load(f) == json.load(g)
    # same seed and data, the same adapter up to float rounding: Adam moves each weight by about
    # ±lr = 1e-3 a step, so a different run is 1e-3 away; gradients near eps = 1e-8 wobble ~1e-5
    assert_close_tensors(trained_tensors(out), trained_tensors(SFT_ADAPTERS[method]), atol=1e-4)
    key = "lora.peft" if method == "lora" else "qlora.peft_nf4"
    assert torch.allclose(logits(tiny_model(method == "qlora", out), ref["input_ids"]), ref[key], atol=1e-4, rtol=0)


# -----------------------------------------------------------------------------
# sft: each method trains, writes its files, and the output loads back


def sft_mean_loss(model, data):
    """Cross-entropy per learned token over every conversation of `data`, one batch."""
    examples = tulu.load_sft_data(data, llama.Tokenizer(HF_TINY), 128)
    task = tulu.SFTTask(pad_id=EOS)
    batch = task.collate(examples)
    with torch.no_grad():
        return float(task.loss(model, batch, task.count(batch))[0])


@pytest.mark.parametrize("method,lr", [("qlora", 3e-2), ("lora", 3e-2), ("full", 3e-3)])
def test_sft_trains_and_writes_outputs(tmp_path, sft_data, method, lr):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # --output may exist: other files are left alone
    N, warmup_ratio = 10, 0.2
    cli("sft", *SMALL, "--data", sft_data, "--method", method, "--max-steps", N, "--lr", lr,
        "--batch-size", 4, "--grad-accum", 1, "--warmup-ratio", warmup_ratio, "--output", out)
    files = set(os.listdir(out))
    assert (out / "notes.txt").read_text() == "mine"
    want = set(ADAPTER_FILES) if method != "full" else {"config.json", "model.safetensors"}
    assert want | set(TOKENIZER_FILES) | {"metrics.jsonl"} <= files
    assert not ({"config.json", "model.safetensors"} | set(ADAPTER_FILES)) - want & files
    assert tulu_tokenizer(out)

    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, N + 1))
    assert all({"step", "loss", "lr"} <= r.keys() for r in rows)
    # HF's linear schedule: 0 -> lr over the warmup steps, then down to 0 at step N
    W = int(N * warmup_ratio)
    assert [r["lr"] for r in rows] == pytest.approx([lr * (i / W if i < W else (N - i) / (N - W)) for i in range(N)])
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]

    # the output loads back, and it is the trained model: a lower loss on its data than the base
    loaded = tiny_model(path=out) if method == "full" else tiny_model(method == "qlora", out)
    base = tiny_model(method == "qlora")
    assert sft_mean_loss(loaded, sft_data) < sft_mean_loss(base, sft_data) - 0.1
    if method != "full":
        with open(out / "adapter_config.json") as f:
            cfg = json.load(f)
        assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (8, 16, 0.1)  # --lora-r, QLoRA's alpha and dropout
        assert cfg["base_model_name_or_path"] == HF_TINY
    else:
        with open(out / "config.json") as f, open(os.path.join(HF_TINY, "config.json")) as g:
            saved, orig = json.load(f), json.load(g)
        assert "quantization_config" not in saved
        assert all(saved[k] == orig[k] for k in ("hidden_size", "num_key_value_heads", "vocab_size", "rms_norm_eps"))


# -----------------------------------------------------------------------------
# Gradient accumulation: every token weighs the same however the step is split


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_sft_micro_batches_give_the_same_step(tmp_path, sft_data, method):
    """One optimiser step on the same 8 conversations as 1 micro-batch of 8 or
    4 micro-batches of 2: the loss (sum of token losses / tokens in the step),
    the gradient norm and the updated weights agree to float rounding."""
    data = first_lines(sft_data, 8, tmp_path / "eight.jsonl")
    outs = {}
    for bs, ga in ((8, 1), (2, 4)):
        outs[bs] = tmp_path / f"{bs}x{ga}"
        cli("sft", *SMALL, "--data", data, "--method", method, "--max-steps", 1, "--lr", 1e-3, "--lora-dropout", 0,
            "--batch-size", bs, "--grad-accum", ga, "--output", outs[bs])
    (a,), (b,) = metrics(outs[8]), metrics(outs[2])
    assert a["tokens"] == b["tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # Adam's first step moves each weight by about ±lr = 1e-3 (g / (|g| + eps)): an update from a
    # different gradient flips signs, 2e-3 apart. (Gradients near eps = 1e-8 wobble a little.)
    assert_close_tensors(trained_tensors(outs[8]), trained_tensors(outs[2]), atol=1e-4)


def test_step_batches_grouped_by_length_take_the_same_examples_longest_first():
    lengths = [5, 40, 7, 40, 12, 3, 25, 9, 18, 30, 2]
    for step in range(4):  # 3 steps an epoch (the last one short), into the next epoch
        plain = tulu.step_batches(11, step, 3, 2, 2, seed=7)
        grouped = tulu.step_batches(11, step, 3, 2, 2, seed=7, lengths=lengths)
        assert sorted(sum(plain, [])) == sorted(sum(grouped, []))
        assert [len(b) for b in grouped] == [len(b) for b in plain]
        flat = [lengths[j] for j in sum(grouped, [])]
        assert flat == sorted(flat, reverse=True)
    examples = Examples(torch.arange(10, dtype=torch.int32), torch.tensor([0, 3, 4, 5, 9, 10]), 1)
    assert example_lengths(examples) == [3, 1, 1, 4, 1]
    pairs = Examples(torch.arange(10, dtype=torch.int32), torch.tensor([0, 2, 4, 7, 10]), 4)  # 2+2, 3+3
    assert example_lengths(pairs) == [3]
    assert example_lengths([([1, 2], [1, 2], [1, 2, 3], [1, 2, 3], -1.5, -2.0)]) == [3]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_group_by_length_pads_less_and_gives_the_same_steps(tmp_path, sft_data, monkeypatch, method):
    """--group-by-length: the same examples each step, so the same losses, gradient norms
    and weights (dropout off) to float rounding, with fewer padded tokens."""
    data = first_lines(sft_data, 16, tmp_path / "sixteen.jsonl")
    padded, collate = [], tulu.SFTTask.collate
    monkeypatch.setattr(tulu.SFTTask, "collate", lambda self, ex: padded.append(
        sum(max(len(e[0]) for e in ex) - len(e[0]) for e in ex)) or collate(self, ex))
    outs, pads = {}, {}
    for grouped in (False, True):
        padded.clear()
        outs[grouped] = tmp_path / f"grouped{grouped}"
        cli("sft", *SMALL, "--data", data, "--method", method, "--max-steps", 3, "--lr", 1e-3, "--lora-dropout", 0,
            "--batch-size", 2, "--grad-accum", 4, "--output", outs[grouped], *["--group-by-length"] * grouped)
        pads[grouped] = sum(padded)
    assert pads[True] < 0.75 * pads[False], pads
    a, b = metrics(outs[False]), metrics(outs[True])
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    # Adam moves a weight by about ±lr a step whatever its gradient's size, so a gradient near
    # eps = 1e-8 that rounds the other way (another summation order) flips: up to 2 x lr x steps
    # apart on a few weights (seen under MKL_CBWR=COMPATIBLE), the rest within rounding
    a, b = trained_tensors(outs[False]), trained_tensors(outs[True])
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert diff.max() <= 2 * 1e-3 * 3 and (diff > 1e-4).float().mean() < 0.01, (diff.max(), (diff > 1e-4).sum())


def test_compile_gives_the_same_steps(tmp_path, sft_data):
    """--compile (torch.compile of each decoder layer, NF4 dequantization and LoRA inside)
    trains as the plain layers do: the same losses and adapter to float rounding (fused
    kernels sum in another order), and writes the same files."""
    data = first_lines(sft_data, 8, tmp_path / "eight.jsonl")
    outs = {c: tmp_path / f"compiled{c}" for c in (False, True)}
    for compiled, out in outs.items():
        cli("sft", *SMALL, "--data", data, "--method", "qlora", "--max-steps", 2, "--lr", 1e-3, "--lora-dropout", 0,
            "--batch-size", 4, "--output", out, *["--compile"] * compiled)
    for x, y in zip(metrics(outs[False]), metrics(outs[True])):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)
    assert_close_tensors(trained_tensors(outs[True]), trained_tensors(outs[False]), atol=1e-4)


# -----------------------------------------------------------------------------
# Ctrl-C and --resume: the resumed run continues the uninterrupted one (SIGTERM, SIGKILL
# and kills during a checkpoint's write: tests/test_resume.py)


def resume_flags(sft_data, method, out):
    # 2 micro-batches a step; qlora keeps LoRA dropout 0.1, so the random state must come back too
    return ["sft", *SMALL, "--data", sft_data, "--method", method, "--max-steps", 6, "--lr", 1e-3,
            "--batch-size", 2, "--grad-accum", 2, "--output", out]


def interrupt_at_call(monkeypatch, n, task=tulu.SFTTask):
    """Ctrl-C (a real SIGINT) during the n-th micro-batch loss (n: a number or several), after
    earlier micro-batches of the same step ran forward, backward and dropout: that step
    completes, then the run stops."""
    loss, calls, at = task.loss, [], {n} if isinstance(n, int) else set(n)

    def wrapper(self, *a, **kw):
        calls.append(1)
        if len(calls) in at:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(self, *a, **kw)
    monkeypatch.setattr(task, "loss", wrapper)


def checkpoint_step(out):
    with open(os.path.join(out, "checkpoint", "trainer_state.json")) as f:
        return json.load(f)["step"]


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_sft_interrupt_and_resume_continue_the_same_run(tmp_path, monkeypatch, capsys, sft_data, method):
    full = tmp_path / "uninterrupted"
    cli(*resume_flags(sft_data, method, full))
    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        interrupt_at_call(m, 2 * 3 + 2)  # the second micro-batch of step 4
        with pytest.raises(SystemExit) as e:
            cli(*resume_flags(sft_data, method, out))
    assert e.value.code == 130
    assert f"--resume {out}" in capsys.readouterr().err
    assert checkpoint_step(out) == 4  # step 4 completed
    assert_close_losses(metrics(out), metrics(full)[:4], atol=1e-5)
    cli(*resume_flags(sft_data, method, out), "--resume", out)
    assert_close_losses(metrics(out), metrics(full), atol=1e-5)
    assert_close_tensors(trained_tensors(out), trained_tensors(full), atol=1e-5)
    assert not os.path.exists(out / "checkpoint")  # finished: finished.json instead


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, sft_data):
    """A second Ctrl-C (here during step 5's second micro-batch, after the first asked to stop
    after that step) stops at once: the step in progress is not saved, the periodic
    checkpoint of step 4 stays, and --resume continues from it."""
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_at_call(m, (2 * 4 + 1, 2 * 4 + 2))
        with pytest.raises(SystemExit) as e:
            cli(*resume_flags(sft_data, "qlora", out), "--save-every", 2)
    assert e.value.code == 130 and "stopped at once: the checkpoint of step 4 stays" in capsys.readouterr().err
    assert checkpoint_step(out) == 4


def test_sft_save_every_checkpoints_and_a_finished_run_removes_it(tmp_path, monkeypatch, sft_data):
    saved, save = [], runs.save_checkpoint
    monkeypatch.setattr(runs, "save_checkpoint", lambda out, step, *a: saved.append(step) or save(out, step, *a))
    out = tmp_path / "saved"
    cli(*resume_flags(sft_data, "qlora", out), "--save-every", 2)
    assert saved == [2, 4]  # not after the last step, which writes the adapter
    assert not os.path.exists(out / "checkpoint") and os.path.exists(out / ADAPTER_FILES[1])
    with open(out / "finished.json") as f:
        assert json.load(f)["step"] == 6


def test_sft_epochs_set_the_number_of_steps(tmp_path, sft_data):
    """Without --max-steps: epochs x ceil(examples / (batch-size x grad-accum)) steps."""
    out = tmp_path / "out"
    cli("sft", *SMALL, "--data", sft_data, "--method", "lora", "--epochs", 2, "--batch-size", 3, "--grad-accum", 2,
        "--output", out)
    per_epoch = math.ceil(16 / (3 * 2))
    rows = metrics(out)
    assert len(rows) == 2 * per_epoch
    assert [r["epoch"] for r in rows] == pytest.approx([(i + 1) / per_epoch for i in range(2 * per_epoch)], abs=1e-3)
    assert sum(r["tokens"] for r in rows[:per_epoch]) == sum(r["tokens"] for r in rows[per_epoch:])  # each sees all


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_adam_flags_reach_the_optimizer(method):
    """Tulu 2's AdamW (0.9, 0.999), 1e-8 by default; --adam-betas/--adam-eps override."""
    model = llama.Llama(llama.LlamaConfig(**demo.TINY, vocab_size=64))
    for extra, betas, eps in [([], (0.9, 0.999), 1e-8), (["--adam-betas", "0.8", "0.95", "--adam-eps", "1e-6"],
                                                         (0.8, 0.95), 1e-6)]:
        args = tulu.build_parser().parse_args(["sft", "--method", method, "--lr", "1e-3", *extra])
        group = tulu.build_optimizer(args, model).param_groups[0]
        assert (tuple(group["betas"]), group["eps"]) == (betas, eps)


def test_sft_resume_writes_into_the_resumed_folder(tmp_path, monkeypatch, sft_data):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at_call(m, 2 * 2 + 1)
        with pytest.raises(SystemExit):
            cli(*resume_flags(sft_data, "qlora", out))
    flags = resume_flags(sft_data, "qlora", out)[:-2]  # as the message says: no --output
    cli(*flags, "--resume", out)
    assert len(metrics(out)) == 6 and os.path.exists(out / ADAPTER_FILES[1])
    assert not os.path.exists(tmp_path / "out")


# -----------------------------------------------------------------------------
# Bad input: one line naming the file (and line), exit status 1, no traceback


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
PAIR = {"chosen": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "5"}]}


def model_folder(tmp_path, edit_config=None, weights=True):
    """A copy of hf_tiny, its config.json edited, or with only pickle weights."""
    d = tmp_path / "model"
    shutil.copytree(HF_TINY, d)
    if edit_config:
        with open(d / "config.json") as f:
            cfg = json.load(f)
        edit_config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    if not weights:
        os.remove(d / "model.safetensors")
        (d / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    return str(d)


ERRORS = {}  # name -> (command, case): case(tmp_path) -> (argv, what the one line must hold)
KNOWN_BUGS = {}  # name -> why the case fails for now


def error_case(command, bug=None):
    def register(case):
        ERRORS[case.__name__] = (command, case)
        if bug:
            KNOWN_BUGS[case.__name__] = bug
        return case
    return register


def sft_file(t, text):
    path = t / "d.jsonl"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def sft_argv(data, model=HF_TINY):
    return ["--model", model, "--data", data, "--batch-size", 1]  # the cases' files hold a line or two


@error_case("sft")
def bad_json(t):
    d = sft_file(t, GOOD + "\n{oops\n")
    return sft_argv(d), [f"{d}:2:", "JSON"]


@error_case("sft")
def not_an_object(t):
    d = sft_file(t, "[1, 2]\n")
    return sft_argv(d), [f"{d}:1:"]


@error_case("sft")
def not_utf8(t):
    d = sft_file(t, GOOD.encode() + b"\n\xff\xfe\n")
    return sft_argv(d), [f"{d}:2:"]


@error_case("sft")
def missing_messages(t):
    d = sft_file(t, GOOD + "\n\n" + json.dumps({"dataset": "x"}) + "\n")
    return sft_argv(d), [f"{d}:3:", "messages"]


@error_case("sft")
def unknown_role(t):
    d = sft_file(t, GOOD + "\n" + GOOD.replace('"user"', '"robot"') + "\n")
    return sft_argv(d), [f"{d}:2:", "robot"]


@error_case("sft")
def empty_file(t):
    d = sft_file(t, "")
    return sft_argv(d), [d, "empty"]


@error_case("sft")
def blank_lines_only(t):
    d = sft_file(t, "\n  \n")
    return sft_argv(d), [d, "empty"]


@error_case("sft")
def missing_data(t):
    return sft_argv(str(t / "nope.jsonl")), [str(t / "nope.jsonl")]


@error_case("sft")
def missing_model(t):
    return sft_argv(sft_file(t, GOOD), model=str(t / "nope")), [str(t / "nope")]


@error_case("sft")
def hidden_act_gelu(t):
    m = model_folder(t, lambda c: c.update(hidden_act="gelu"))
    return sft_argv(sft_file(t, GOOD), m), [os.path.join(m, "config.json"), "gelu"]


@error_case("sft")
def rope_parameters_yarn(t):  # transformers 5 writes rope settings under rope_parameters
    m = model_folder(t, lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                            "original_max_position_embeddings": 128}))
    return sft_argv(sft_file(t, GOOD), m), [os.path.join(m, "config.json"), "yarn"]


@error_case("sft")
def rope_scaling_yarn(t):  # and transformers 4 under rope_scaling
    m = model_folder(t, lambda c: c.update(rope_scaling={"type": "yarn", "factor": 4.0}))
    return sft_argv(sft_file(t, GOOD), m), [os.path.join(m, "config.json"), "yarn"]


@error_case("sft")
def pickle_only(t):
    m = model_folder(t, weights=False)
    return sft_argv(sft_file(t, GOOD), m), [m, "pytorch_model.bin"]


@error_case("sft")
def resume_without_checkpoint(t):
    return sft_argv(sft_file(t, GOOD)) + ["--resume", str(t)], [str(t), "checkpoint"]


@error_case("sft")
def resume_with_another_method(t):
    data, out = sft_file(t, GOOD), str(t / "run")
    cli("sft", *sft_argv(data), "--method", "qlora", "--lora-r", 8, "--max-steps", 2, "--save-every", 1, "--output", out)
    # the run finished: its settings are in finished.json (a checkpoint's: tests/test_resume.py)
    return (sft_argv(data) + ["--method", "full", "--resume", out, "--output", out],
            [os.path.join(out, "finished.json"), "method: qlora -> full"])


@error_case("sft")
def output_is_a_file(t):
    (t / "afile").write_text("")
    return sft_argv(sft_file(t, GOOD)) + ["--max-steps", 1, "--output", str(t / "afile")], [str(t / "afile")]


@error_case("sft")
def resume_with_other_adam_betas(t):
    data, out = sft_file(t, GOOD), str(t / "run")
    cli("sft", *sft_argv(data), "--lora-r", 8, "--max-steps", 2, "--save-every", 1, "--output", out)
    return (sft_argv(data) + ["--lora-r", 8, "--resume", out, "--adam-betas", 0.9, 0.95],
            ["adam_betas: [0.9, 0.999] -> [0.9, 0.95]"])


def prefs_file(t, *rows):
    return sft_file(t, "".join(json.dumps(r) + "\n" for r in rows))


@error_case("dpo")
def rejected_missing(t):
    d = prefs_file(t, PAIR, {"chosen": PAIR["chosen"]})
    return sft_argv(d), [f"{d}:2:", "rejected"]


@error_case("dpo")
def different_prompts(t):
    other = [{"role": "user", "content": "3 + 3?"}, {"role": "assistant", "content": "5"}]
    d = prefs_file(t, PAIR, {**PAIR, "rejected": other})
    return sft_argv(d), [f"{d}:2:"]


@error_case("dpo")
def all_pairs_truncated(t):
    d = prefs_file(t, PAIR, PAIR)
    return sft_argv(d) + ["--max-seq-length", 4, "--max-steps", 2, "--output", str(t / "o")], [d]


@error_case("dpo")
def adapter_with_full(t):
    return sft_argv(prefs_file(t, PAIR)) + ["--method", "full", "--adapter", SFT_ADAPTERS["lora"]], ["--adapter"]


@error_case("merge")
def merge_missing_adapter(t):
    return ["--model", HF_TINY, "--adapter", str(t / "nope"), "--output", str(t / "o")], [str(t / "nope")]


@error_case("merge")
def merge_output_is_a_file(t):
    (t / "afile").write_text("")
    return (["--model", HF_TINY, "--adapter", SFT_ADAPTERS["lora"], "--output", str(t / "afile")],
            [str(t / "afile")])


@error_case("chat")
def chat_missing_model(t):
    return ["--model", str(t / "nope"), "--prompt", "hi"], [str(t / "nope")]


# Mistakes caught before any step (issue 16): a tokenizer with ids the embedding lacks, a
# file for the other command, a batch larger than the data, an --output that is an input


def resized_model(t, rows):
    """A copy of hf_tiny whose embedding and lm_head have `rows` rows (its tokenizer: 768 ids):
    cut (tokens added without resizing, or a wrong tokenizer.model copied in) or padded."""
    d = t / f"model{rows}"
    shutil.copytree(HF_TINY, d)
    sd = load_file(d / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        w = sd[k]
        sd[k] = w[:rows].clone() if rows <= len(w) else torch.cat([w, w[:rows - len(w)]])
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": rows}))
    return str(d)


VOCAB_WANT = lambda m: ["768", "500", os.path.join(m, "tokenizer.model"), os.path.join(m, "config.json")]


@error_case("chat")
def chat_tokenizer_larger_than_embedding(t):
    m = resized_model(t, 500)
    return ["--model", m, "--prompt", "hi"], VOCAB_WANT(m)


@error_case("merge")
def merge_tokenizer_larger_than_embedding(t):
    m = resized_model(t, 500)
    return ["--model", m, "--adapter", SFT_ADAPTERS["lora"], "--output", str(t / "o")], VOCAB_WANT(m)


@error_case("sft")
def prefs_file_to_sft(t):
    d = prefs_file(t, PAIR)
    return sft_argv(d), [f"{d}:1:", "preference pair", "tulu.py dpo"]


@error_case("dpo")
def sft_file_to_dpo(t):
    d = sft_file(t, GOOD + "\n")
    return sft_argv(d), [f"{d}:1:", "conversation", "tulu.py sft"]


@error_case("sft")
def batch_larger_than_data(t):
    d = sft_file(t, GOOD + "\n" + GOOD + "\n")
    return sft_argv(d) + ["--batch-size", 4], ["--batch-size 4", "2 conversations", d]


@error_case("dpo")
def dpo_batch_larger_than_data(t):
    d = prefs_file(t, PAIR)
    return sft_argv(d) + ["--batch-size", 2], ["--batch-size 2", "1 preference pair ", d]


@error_case("sft")
def output_is_the_model(t):
    m = model_folder(t)  # a copy: were the check missing, `full` would write over it
    return sft_argv(sft_file(t, GOOD), m) + ["--method", "full", "--output", m + "/"], ["--output", "--model"]


@error_case("dpo")
def output_is_the_adapter(t):
    a = str(t / "adapter")
    shutil.copytree(SFT_ADAPTERS["lora"], a)
    return (sft_argv(prefs_file(t, PAIR)) + ["--method", "lora", "--adapter", a, "--output", a],
            ["--output", "--adapter"])


@error_case("merge")
def merge_output_is_the_model(t):
    m = model_folder(t)
    return ["--model", m, "--adapter", SFT_ADAPTERS["lora"], "--output", m], ["--output", "--model"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[n]))
                                  if n in KNOWN_BUGS else n for n in ERRORS])
def test_bad_input_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)  # where a default --output (out/...) would go
    command, case = ERRORS[name]
    argv, want = case(tmp_path)
    capsys.readouterr()  # what a case ran to set itself up
    line = one_line_error(capsys, command, argv)
    for w in want:
        assert str(w) in line, (w, line)


@pytest.mark.parametrize("flag", ["--batch-size", "--grad-accum", "--lora-r"])
def test_zero_sizes_are_refused_without_traceback(tmp_path, capsys, sft_data, flag):
    with pytest.raises(SystemExit) as e:
        cli("sft", *SMALL, "--data", sft_data, "--max-steps", 1, flag, 0, "--output", tmp_path / "out")
    assert e.value.code != 0
    assert flag in visible_lines(capsys.readouterr().err)[-1]


@pytest.mark.parametrize("name", ["bad_json", "missing_model", "different_prompts"])
def test_bad_input_as_a_user_sees_it(tmp_path, name):
    """In a process of its own: exit status 1, one line on stderr, no traceback."""
    command, case = ERRORS[name]
    argv, want = case(tmp_path)
    p = run(command, *argv, cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = visible_lines(p.stderr)
    assert len(lines) == 1 and all(w in lines[0] for w in want), lines


def test_tokenizer_larger_than_embedding_stops_before_any_step(tmp_path, sft_data):
    """The issue's case (a 32,000-piece tokenizer.model beside 500 embedding rows) on
    hf_tiny's scale: 768 ids, 500 rows. Without the check: an IndexError traceback
    from inside F.embedding, once training reaches an id >= 500."""
    m, out = resized_model(tmp_path, 500), tmp_path / "out"
    p = run("sft", "--model", m, "--data", sft_data, "--batch-size", 4, "--output", out)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = visible_lines(p.stderr)
    assert len(lines) == 1 and all(w in lines[0] for w in VOCAB_WANT(m)), lines
    assert not os.path.exists(out)  # stopped before any step


def test_embedding_larger_than_tokenizer_is_fine(tmp_path, sft_data):
    """Padded vocabularies (more rows than the tokenizer has ids) train as usual."""
    out = tmp_path / "out"
    cli("sft", *SMALL, "--model", resized_model(tmp_path, 800), "--data", sft_data, "--method", "full",
        "--max-steps", 1, "--batch-size", 4, "--output", out)
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].shape[0] == 800


def test_merge_does_not_need_a_tokenizer_it_cannot_read(tmp_path):
    """merge copies a tokenizer; one tulu does not read (a tokenizer.json it cannot
    parse) is no reason to refuse the merge, as it was not before the vocabulary check."""
    m = model_folder(tmp_path)
    os.remove(os.path.join(m, "tokenizer.model"))
    pathlib.Path(m, "tokenizer.json").write_text("{}")
    cli("merge", "--model", m, "--adapter", SFT_ADAPTERS["lora"], "--output", tmp_path / "merged")
    assert os.path.exists(tmp_path / "merged" / "model.safetensors")


def test_examples_beyond_the_context_warn_and_train(tmp_path, capsys, sft_data):
    """--max-seq-length past max_position_embeddings: a warning, as transformers gives,
    naming both lengths; RoPE runs on past the context, so training goes ahead."""
    ctx = 32
    m = model_folder(tmp_path, lambda c: c.update(max_position_embeddings=ctx))
    argv = ["--data", sft_data, "--method", "lora", "--max-steps", 1, "--batch-size", 4]
    cli("sft", *SMALL, "--model", m, *argv, "--output", tmp_path / "out")
    warned = [line for line in visible_lines(capsys.readouterr().err) if "warning" in line]
    assert len(warned) == 1 and f"max_position_embeddings {ctx}" in warned[0] and "--max-seq-length 128" in warned[0]
    assert len(metrics(tmp_path / "out")) == 1
    cli("sft", *SMALL, *argv, "--output", tmp_path / "out2")  # hf_tiny: 512 positions, no example that long
    assert "warning" not in capsys.readouterr().err


def strict_json(line):
    """json.loads as strict readers (jq, JavaScript) parse: no NaN or Infinity."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


def all_safetensors(out):
    return [os.path.join(d, n) for d, _, names in os.walk(out) for n in names if n.endswith(".safetensors")]


def test_divergence_stops_at_the_first_non_finite_step(tiny_default, tmp_path, monkeypatch, capsys):
    """The issue's run: full fine-tuning of the tiny default at lr 1e4 goes non-finite
    within a few steps. It must stop there, exit 1 with one line naming that step and
    the flags to change; metrics.jsonl stays strict JSON; no file it leaves holds a
    non-finite value; the checkpoint of the last good step stays and --resume takes it."""
    out = tmp_path / "out"
    argv = ["sft", "--method", "full", "--lr", "1e4", "--max-steps", 8, "--save-every", 1, "--output", out]
    p = run(*argv, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [line for line in visible_lines(p.stderr) if line.startswith("tulu sft: error: ")]
    assert len(errors) == 1 and errors[0] == visible_lines(p.stderr)[-1], visible_lines(p.stderr)
    with open(out / "metrics.jsonl") as f:
        rows = [strict_json(line) for line in f]
    bad = [r["step"] for r in rows if r["loss"] is None or r["grad_norm"] is None]
    assert bad and rows[-1]["step"] == bad[0] >= 2, rows  # stopped at the first one, after a good step
    assert rows[-1]["nonfinite"] and all(math.isfinite(r["loss"]) for r in rows[:-1])
    assert f"step {bad[0]}:" in errors[0] and "--lr" in errors[0] and "--max-grad-norm" in errors[0], errors[0]
    assert not {"model.safetensors", "config.json"} & set(os.listdir(out))  # no model written
    files = all_safetensors(out)
    assert files and all(torch.isfinite(t.float()).all() for f in files for t in load_file(f).values())
    assert checkpoint_step(out) == bad[0] - 1
    import xml.etree.ElementTree as ET
    assert "non-finite" in "".join(ET.parse(out / "loss.svg").getroot().itertext())
    # the same run resumed from the kept checkpoint continues the same curve, to the same stop
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli(*argv, "--resume", out)
    got = capsys.readouterr()
    assert e.value.code == 1 and f"resumed from {out / 'checkpoint'} after step {bad[0] - 1}" in got.out
    assert f"step {bad[0]}:" in visible_lines(got.err)[-1]
    with open(out / "metrics.jsonl") as f:
        again = [strict_json(line) for line in f]
    assert [r["step"] for r in again] == [r["step"] for r in rows]
    assert_close_losses(again[:-1], rows[:-1], atol=0)


def test_a_non_finite_step_is_never_applied(tmp_path, monkeypatch):
    """A step whose loss or gradients are NaN leaves weights and optimiser state as they
    were, and the run stops on it with one line."""
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(**demo.TINY, vocab_size=64)).requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = tulu.SFTTask(pad_id=0)
    task.loss = lambda m, b, d: (tulu.SFTTask.loss(task, m, b, d)[0] * float("nan"), {})
    opts, build = [], tulu.build_optimizer
    monkeypatch.setattr(tulu, "build_optimizer", lambda *a: opts.append(build(*a)) or opts[-1])
    args = tulu.TrainConfig(command="sft", method="full", lr=1e-3, epochs=1, batch_size=1, grad_accum=1,
                            warmup_ratio=0.0, max_grad_norm=1.0, save_minutes=0, device="cpu", dtype=torch.float32)
    with pytest.raises(llama.TuluError, match="step 1: the loss is nan and the gradient norm is nan"):
        tulu.train(args, model, [([1, 5, 7, 2], [-100, 5, 7, 2])], task, str(tmp_path))
    assert not opts[0].state and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_non_finite_weights_are_never_written(tmp_path):
    """A step can overflow a weight even with a finite loss: neither the output nor a
    checkpoint is then written."""
    model = tiny_model().requires_grad_(True)
    with torch.no_grad():
        model.lm_head.weight[3, 1] = float("inf")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(llama.TuluError, match="lm_head.weight"):
        outputs.save_outputs(tulu.TrainConfig(method="full"), model, HF_TINY, str(tmp_path))
    with pytest.raises(llama.TuluError, match="lm_head.weight"):
        runs.save_checkpoint(str(tmp_path), 1, model, opt, runs.rng_state(), {})
    assert os.listdir(tmp_path) == []


def test_loss_svg_draws_a_run_that_diverged():
    import xml.etree.ElementTree as ET
    rows = [checks.json_safe({"step": s, "loss": v, "grad_norm": 1.0}) for s, v in ((1, 2.0), (2, 1.5), (3, math.nan))]
    assert rows[-1] == {"step": 3, "loss": None, "grad_norm": 1.0, "nonfinite": {"loss": "nan"}}
    svg = ET.fromstring(runs.loss_svg(rows, "diverged"))
    assert "non-finite" in "".join(svg.itertext())
    assert "non-finite" in "".join(ET.fromstring(runs.loss_svg(rows[-1:], "at once")).itertext())


class Trap:
    """Unpickled, it creates a folder: the code a booby-trapped pickle runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("command", ["merge", "chat"])
def test_booby_trapped_bin_adapter_as_a_user_sees_it(tmp_path, command):
    """An adapter whose adapter_model.bin would run code when unpickled (tests/test_lora.py
    shows that plain unpickling runs it): one line naming the file, exit status 1, no
    traceback; the code never ran and nothing was written."""
    marker, adapter, out = tmp_path / "the_trap_ran", tmp_path / "adapter", tmp_path / "merged"
    adapter.mkdir()
    shutil.copy(os.path.join(SFT_ADAPTERS["lora"], ADAPTER_FILES[0]), adapter)
    tensors = load_file(os.path.join(SFT_ADAPTERS["lora"], ADAPTER_FILES[1]))
    torch.save({**tensors, "trap": Trap(str(marker))}, adapter / "adapter_model.bin")
    argv = ["--output", out] if command == "merge" else ["--prompt", "Hi"]
    p = run(command, "--model", HF_TINY, "--adapter", adapter, *argv)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = visible_lines(p.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"tulu {command}: error: {adapter}/adapter_model.bin: refused"), lines
    assert not marker.exists() and not out.exists()


# -----------------------------------------------------------------------------
# dpo: policy = reference at step 0, and the reference is the right model


def dpo_flags(prefs_data, method, out, steps=3, adapter=None):
    return ["dpo", *SMALL, "--data", prefs_data, "--method", method, "--max-steps", steps, "--lr", 1e-2 if method != "full"
            else 1e-3, "--batch-size", 4, "--grad-accum", 1, "--output", out] + (["--adapter", adapter] if adapter else [])


DPO_CASES = [("qlora", None), ("lora", None), ("full", None), ("lora", "lora"), ("qlora", "qlora")]


@pytest.mark.parametrize("method,adapter", DPO_CASES, ids=["qlora", "lora", "full", "lora+adapter", "qlora+adapter"])
def test_dpo_step0_loss_is_ln2(tmp_path, prefs_data, method, adapter):
    """At step 0 the policy is the reference: every reward β·(π − ref) is 0 and
    the loss −log σ(0) = ln 2. A step later the policy has moved and the reference
    has not, so the loss is no longer ln 2 (a reference that followed the policy
    would keep it there)."""
    out = tmp_path / "out"
    cli(*dpo_flags(prefs_data, method, out, adapter=adapter and SFT_ADAPTERS[adapter]))
    rows = metrics(out)
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
            "logps/rejected", "step", "lr"}
    assert all(keys <= r.keys() for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert rows[0][k] == pytest.approx(0, abs=1e-5), k
    assert abs(rows[-1]["loss"] - math.log(2)) > 1e-4 and abs(rows[-1]["rewards/margin"]) > 1e-5
    assert set(ADAPTER_FILES if method != "full" else ("config.json", "model.safetensors")) <= set(os.listdir(out))


def record_logps(monkeypatch):
    """Every dpo.concatenated_logps call of the run: (batch, (chosen, rejected), adapters off?)."""
    calls, f = [], dpo.concatenated_logps

    def wrapper(model, batch, average=False):
        got = f(model, batch, average)
        off = any(m.disabled for m in lora.lora_layers(model).values())
        calls.append((batch, tuple(x.detach().clone() for x in got), off))
        return got
    monkeypatch.setattr(dpo, "concatenated_logps", wrapper)
    return calls


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_dpo_reference_under_adapters_disabled_is_the_base(tmp_path, monkeypatch, prefs_data, method):
    """LoRA's reference is the model with its adapters off: at the last step, after
    the adapters moved, its log-probs equal those of a freshly loaded base."""
    calls = record_logps(monkeypatch)
    cli(*dpo_flags(prefs_data, method, tmp_path / "out"))
    (batch, policy, _), (batch_ref, reference, off) = calls[-2], calls[-1]
    assert off and batch is batch_ref
    fresh = dpo.concatenated_logps(tiny_model(method == "qlora"), batch)
    for got, want in zip(reference, fresh):
        assert torch.allclose(got, want.detach(), atol=1e-5, rtol=0)
    assert not torch.allclose(policy[0], reference[0], atol=1e-3)  # the policy did move


def capture_cached_reference(monkeypatch):
    seen, f = [], tulu.cache_reference

    def wrapper(*a, **kw):
        seen.append(f(*a, **kw))
        return seen[-1]
    monkeypatch.setattr(tulu, "cache_reference", wrapper)
    return seen


@pytest.mark.parametrize("method,adapter", [("full", None), ("lora", "lora"), ("qlora", "qlora")],
                         ids=["full", "lora+adapter", "qlora+adapter"])
def test_dpo_cached_reference_is_the_starting_model(tmp_path, monkeypatch, prefs_data, method, adapter):
    """Full fine-tuning and --adapter cache the reference log-probs before the
    first update: those of the starting model, i.e. the SFT model base + adapter
    for --adapter (not the bare base that switching adapters off would give)."""
    seen = capture_cached_reference(monkeypatch)
    cli(*dpo_flags(prefs_data, method, tmp_path / "out", steps=1, adapter=adapter and SFT_ADAPTERS[adapter]))
    (pairs,) = seen
    assert len(pairs) == 16 and all(len(p) == 6 for p in pairs)
    cached = torch.tensor([[p[4], p[5]] for p in pairs])  # (pairs, chosen/rejected)
    batch = dpo.collate_pairs([p[:4] for p in pairs], EOS)
    nf4 = method == "qlora"
    start = torch.stack(dpo.concatenated_logps(tiny_model(nf4, adapter and SFT_ADAPTERS[adapter]), batch), -1)
    assert torch.allclose(cached, start.detach(), atol=1e-4, rtol=0)
    if adapter:
        bare = torch.stack(dpo.concatenated_logps(tiny_model(nf4), batch), -1)
        assert (cached - bare).abs().max() > 1e-2  # base + adapter is not the bare base


def test_dpo_interrupt_and_resume_keep_the_cached_reference(tmp_path, monkeypatch, prefs_data):
    """DPO --method full caches the reference from the starting weights; a resumed
    run must score it from those too (not from the checkpoint's trained weights)."""
    full = tmp_path / "uninterrupted"
    cli(*dpo_flags(prefs_data, "full", full, steps=4))
    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        interrupt_at_call(m, 3, tulu.DPOTask)  # one micro-batch a step: during step 3
        with pytest.raises(SystemExit) as e:
            cli(*dpo_flags(prefs_data, "full", out, steps=4))
    assert e.value.code == 130 and checkpoint_step(out) == 3
    cli(*dpo_flags(prefs_data, "full", out, steps=4), "--resume", out)
    assert_close_losses(metrics(out), metrics(full), atol=1e-5)
    assert_close_tensors(trained_tensors(out), trained_tensors(full), atol=1e-5)


def test_dpo_demo_raises_heldout_accuracy(tmp_path, monkeypatch, capsys, tiny_default):
    """`python tulu.py dpo` with no --model: the demo SFT of the tiny default runs
    first (cut to DEMO_SFT_STEPS steps here), then DPO on data/ preferences.
    Held-out accuracy (share of pairs whose chosen reward beats the rejected one)
    is 0 at step 0, where every reward is 0, and above chance after training. At the
    end, held-out prompts with the SFT and the DPO answer, and each one's exact match."""
    main = tulu.main
    monkeypatch.setattr(tulu, "main", lambda argv: main(argv + ["--max-steps", str(DEMO_SFT_STEPS)]
                                                        if argv[0] == "sft" else argv))
    held, f = [], evaluate.held_out_metrics
    monkeypatch.setattr(evaluate, "held_out_metrics", lambda *a: held.append(f(*a)) or held[-1])
    out = tmp_path / "out"
    main(["dpo", "--max-steps", "20", "--output", str(out)])
    sft = tiny_default.replace("tiny-llama-", "tiny-sft-")
    assert len(metrics(sft)) == DEMO_SFT_STEPS and os.path.exists(os.path.join(sft, "model.safetensors"))
    before, after = held
    assert before["rewards/accuracy"] == 0 and before["rewards/margin"] == 0
    assert after["rewards/accuracy"] > 0.5 and after["rewards/margin"] > 0, after
    assert metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    printed = capsys.readouterr().out
    prompts = evaluate.answer_prompts(data.read_jsonl(os.path.join(DATA, "sft_heldout.jsonl"), "sft"), 4)
    for msgs, reference in prompts:
        assert f"\n> {msgs[-1]['content']}\n  reference  {reference}\n  SFT        " in printed
    assert re.search(r"exact match, greedy, on the first 40 conversations of .*sft_heldout.jsonl: "
                     r"SFT [01]\.\d\d, DPO [01]\.\d\d\n", printed), printed[-2000:]


# -----------------------------------------------------------------------------
# merge: an HF folder computing what base + adapter computes


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_merge_writes_the_adapter_model(tmp_path, ref, qlora):
    method = "qlora" if qlora else "lora"
    out = tmp_path / "merged"
    cli("merge", "--model", HF_TINY, "--adapter", SFT_ADAPTERS[method], "--output", out, "--dtype", "fp32",
        *(["--qlora"] if qlora else []))
    assert {"config.json", "model.safetensors", *TOKENIZER_FILES} <= set(os.listdir(out))
    assert not set(ADAPTER_FILES) & set(os.listdir(out))
    assert tulu_tokenizer(out)
    with open(out / "config.json") as f:
        cfg = json.load(f)
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    ids = ref["input_ids"]
    merged = logits(tiny_model(path=out), ids)
    # --qlora: the adapter was trained on the NF4 base, and the merge dequantizes that base
    adapter_model = logits(tiny_model(qlora, SFT_ADAPTERS[method]), ids)
    assert torch.allclose(merged, adapter_model, atol=1e-4 if qlora else 1e-5, rtol=0)
    assert torch.allclose(merged, ref["qlora.peft_nf4" if qlora else "lora.peft"], atol=1e-4, rtol=0)


def test_merge_default_dtype_is_bf16(tmp_path):
    out = tmp_path / "merged"
    cli("merge", "--model", HF_TINY, "--adapter", SFT_ADAPTERS["lora"], "--output", out)
    with open(out / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


# -----------------------------------------------------------------------------
# chat: the Tulu prompt, a greedy answer; once, or line by line until EOF


def greedy_answers(model, tok, prompts, max_new_tokens, system=None):
    """What chat should print: each prompt in the Tulu format after the
    conversation so far (tulu.encode_prompt), answered greedily."""
    history, answers = ([{"role": "system", "content": system}] if system else []), []
    for p in prompts:
        history.append({"role": "user", "content": p})
        ids = llama.generate(model, tulu.encode_prompt(history, tok), max_new_tokens, eos_id=tok.eos_id)
        answers.append(tok.decode([i for i in ids if i != tok.eos_id]))
        history.append({"role": "assistant", "content": answers[-1]})
    return answers


@pytest.fixture(scope="session")
def tiny_adapter(tiny_default, sft_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_adapter")
    cli("sft", "--model", tiny_default, "--data", sft_data, "--method", "lora", "--max-steps", 5, "--lr", 3e-2,
        "--lora-r", 8, "--batch-size", 4, "--grad-accum", 1, "--output", out)
    return str(out)


def test_dpo_demo_with_an_sft_adapter_starts_with_zero_rewards(tmp_path, monkeypatch, tiny_default, tiny_adapter):
    """The demo (no --model) with --adapter: the reference is base + SFT adapter on
    the held-out pairs too, so at step 0 every held-out reward is 0."""
    monkeypatch.setattr(tulu, "tiny_sft", lambda: tiny_default)  # the base tiny_adapter was trained on
    held, f = [], evaluate.held_out_metrics
    monkeypatch.setattr(evaluate, "held_out_metrics", lambda *a: held.append(f(*a)) or held[-1])
    cli("dpo", "--adapter", tiny_adapter, "--method", "lora", "--max-steps", 1, "--output", tmp_path / "out")
    assert held[0]["rewards/accuracy"] == 0 and held[0]["rewards/margin"] == 0, held[0]


def test_loss_svg_escapes_its_title():
    import xml.etree.ElementTree as ET
    rows = [{"step": s, "loss": 1 / s} for s in range(1, 5)]
    svg = ET.fromstring(runs.loss_svg(rows, "R&D <llama>"))
    assert "R&D <llama>" in "".join(svg.itertext())


def test_chat_prompt_prints_the_greedy_answer(tiny_default):
    prompt = "What is 3 + 4?"
    (want,) = greedy_answers(tiny_model(path=tiny_default), llama.Tokenizer(tiny_default), [prompt], 8)
    p = run("chat", "--model", tiny_default, "--prompt", prompt, "--max-new-tokens", 8)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert p.stdout == f"<|assistant|>\n{want}\n"
    assert want.strip()


def test_chat_interactive_reads_lines_until_eof(tiny_default, monkeypatch, capsys):
    prompts = ["What is 3 + 4?", "Now add 2.", "Spell the word \"cat\"."]
    want = greedy_answers(tiny_model(path=tiny_default), llama.Tokenizer(tiny_default), prompts, 8)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(p + "\n" for p in prompts)))
    cli("chat", "--model", tiny_default, "--max-new-tokens", 8)  # returns at EOF
    ask = "\n<|user|>\n"
    assert capsys.readouterr().out == "".join(f"{ask}<|assistant|>\n{a}\n" for a in want) + ask


def test_chat_interactive_stops_at_exit(tiny_default, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/exit\nnever read\n"))
    cli("chat", "--model", tiny_default, "--max-new-tokens", 2)
    assert capsys.readouterr().out.count("<|assistant|>") == 1


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_chat_with_adapter_and_system(tiny_default, tiny_adapter, monkeypatch, capsys, system):
    """--adapter answers as base + adapter (merged in memory, as chat does), and
    --system opens the conversation: the prompt chat sends to the model is the
    chat format of [system, user], and the model it sends it to is not the base."""
    prompt, tok = "What is 3 + 4?", llama.Tokenizer(tiny_adapter)
    model = tiny_model(adapter=tiny_adapter, path=tiny_default)
    lora.merge_lora(model)
    (want,) = greedy_answers(model, tok, [prompt], 8, system=system)
    sent, real = [], llama.generate
    monkeypatch.setattr(llama, "generate", lambda m, ids, *a, **kw: sent.append((m, list(ids))) or real(m, ids, *a, **kw))
    cli("chat", "--model", tiny_default, "--adapter", tiny_adapter, "--prompt", prompt, "--max-new-tokens", 8,
        *(["--system", system] if system else []))
    assert capsys.readouterr().out == f"<|assistant|>\n{want}\n"
    history = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    (chat_model, ids), = sent
    assert ids == tulu.encode_prompt(history, tok)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(chat_model(x), model(x), atol=1e-5)
        assert not torch.allclose(chat_model(x), tiny_model(path=tiny_default)(x), atol=1e-3)


def test_chat_defaults_to_the_demo_sft_model(tiny_default, sft_data, tmp_path, monkeypatch, capsys):
    """Without --model, chat talks to the model the demo DPO starts from (README:
    `tulu.py chat --adapter out/dpo-qlora`), the demo SFT model, not the base. Here
    the SFT model is a few full-SFT steps on the tiny default, which answer otherwise."""
    sft = tmp_path / "sft"
    cli("sft", "--model", tiny_default, "--data", sft_data, "--method", "full", "--max-steps", 3, "--lr", 1e-2,
        "--batch-size", 4, "--grad-accum", 1, "--output", sft)
    capsys.readouterr()
    monkeypatch.setattr(tulu, "tiny_sft", lambda: str(sft))
    monkeypatch.setattr(tulu, "tiny_default", lambda: tiny_default)
    argv = ["--prompt", "What is 3 + 4?", "--max-new-tokens", 8]
    answers = {}
    for model in ("sft", "base", None):
        cli("chat", *(["--model", str(sft) if model == "sft" else tiny_default] if model else []), *argv)
        answers[model] = capsys.readouterr().out
    assert answers[None] == answers["sft"] != answers["base"]


def test_chat_prints_the_answer_it_keeps_when_cut_inside_a_character(monkeypatch, capsys):
    """--max-new-tokens can stop between the byte tokens of one character. What
    chat printed as the answer must be what it keeps in the conversation (and
    sends back to the model with the next prompt), whichever way it treats the
    broken character."""
    tok = llama.Tokenizer(HF_TINY)
    cut = tok.encode("café")[:-1]  # the last byte of "é" never comes
    prompts = []

    def fake_generate(model, prompt_ids, max_new_tokens, on_token=None, eos_id=None, **kw):
        prompts.append(list(prompt_ids))
        out = cut if len(prompts) == 1 else [eos_id[0] if isinstance(eos_id, list) else eos_id]
        for i in out:
            on_token(i)
        return out
    monkeypatch.setattr(llama, "generate", fake_generate)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nagain\n"))
    cli("chat", "--model", HF_TINY, "--max-new-tokens", len(cut))
    shown = capsys.readouterr().out.split("<|assistant|>\n")[1].split("\n")[0]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": shown},
               {"role": "user", "content": "again"}]
    assert prompts[1] == tulu.encode_prompt(history, tok)


def test_chat_bad_model_path_as_a_user_sees_it(tmp_path):
    p = run("chat", "--model", tmp_path / "nope", "--prompt", "hi")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    lines = visible_lines(p.stderr)
    assert len(lines) == 1 and str(tmp_path / "nope") in lines[0], lines


# -----------------------------------------------------------------------------
# eval and the training commands: each input read once, --device and --dtype resolved once


def count_calls(monkeypatch, module, name):
    """The arguments of every call of module.name from now on (the function still runs)."""
    calls, f = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(a) or f(*a, **kw))
    return calls


def test_eval_reads_its_multiple_choice_file_once(tmp_path, monkeypatch, capsys):
    """The kind of --data comes from its first object and the questions from all of them:
    one pass over the file (and one over --dev)."""
    rows = [{"question": f"{i} + 1?", "choices": [str(i + 1), str(i + 2)], "answer": 0} for i in range(3)]
    data_file, dev = tmp_path / "mc.jsonl", tmp_path / "dev.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev.write_text(json.dumps(rows[0]) + "\n")
    reads = count_calls(monkeypatch, data, "read_objects")
    cli("eval", "--model", HF_TINY, "--data", data_file, "--dev", dev, "--shots", 1)
    assert [a[0] for a in reads] == [str(data_file), str(dev)]
    assert "3 questions, 1-shot" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["sft", "eval"])
def test_device_and_dtype_are_resolved_once(tmp_path, monkeypatch, sft_data, command):
    resolved = count_calls(monkeypatch, cli_module, "device_and_dtype")
    if command == "sft":
        cli("sft", *SMALL, "--data", sft_data, "--method", "lora", "--max-steps", 1, "--batch-size", 4,
            "--output", tmp_path / "out")
    else:
        cli("eval", "--model", HF_TINY, "--data", sft_data, "--max-seq-length", 128)
    assert resolved == [("auto", "auto")]


# -----------------------------------------------------------------------------
# --help, and README's commands on the tiny default


def help_text(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli(command, "--help")
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def option_help(text, flag):
    """The help of one option: from its name to the next option's."""
    start = text.index(f" {flag} ")
    nxt = text.find(" --", start + len(flag) + 2)
    return text[start:nxt if nxt > 0 else None]


def test_help_shows_the_recipe_defaults(capsys):
    for command in ("sft", "dpo"):
        text = help_text(capsys, command)
        for family in ("full", "lora"):
            r = tulu.RECIPES[(command, family)]
            assert str(r["lr"]) in option_help(text, "--lr"), (command, family)
            assert str(r["epochs"]) in option_help(text, "--epochs")
        assert "QLoRA" in text
    text = help_text(capsys, "sft")
    assert "2e-05" in option_help(text, "--lr") and "0.0001" in option_help(text, "--lr")
    for flag, value in (("--lora-r", "64"), ("--lora-alpha", "16"), ("--lora-dropout", "0.1"), ("--seed", "42")):
        assert value in option_help(text, flag), flag


SOURCES = ("Tulu 2", "QLoRA", "open-instruct", "model card", "arXiv", "alignment-handbook", "TRL", "DPO")


def test_help_names_the_source_of_each_default(capsys):
    text = help_text(capsys, "sft")
    flags = ["--epochs", "--lr", "--batch-size", "--grad-accum", "--max-seq-length", "--warmup-ratio",
             "--max-grad-norm", "--weight-decay", "--lora-r", "--lora-alpha", "--lora-dropout", "--seed"]
    missing = [f for f in flags if not any(s in option_help(text, f) for s in SOURCES)]
    assert not missing, missing


def test_tiny_default_is_cached_and_deterministic(tiny_default, tmp_path, monkeypatch):
    """Built once: a second call finds it (train is never called); built again
    elsewhere, the same bytes. It is a real HF folder with its tokenizer."""
    assert {"config.json", "model.safetensors", *TOKENIZER_FILES} <= set(os.listdir(tiny_default))
    rows = metrics(tiny_default)
    assert len(rows) == PRETRAIN_STEPS and rows[-1]["loss"] < rows[0]["loss"]
    cfg = llama.LlamaConfig.from_json(os.path.join(tiny_default, "config.json"))
    assert all(getattr(cfg, k) == v for k, v in demo.TINY.items())
    assert cfg.vocab_size == llama.Tokenizer(tiny_default).vocab_size
    with monkeypatch.context() as m:
        m.setattr(tulu, "train", lambda *a: pytest.fail("rebuilt a cached model"))
        assert tulu.tiny_default() == tiny_default
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(tulu, "train", short_pretraining(PRETRAIN_STEPS))
    again = tulu.tiny_default()
    assert again != tiny_default and again.startswith(str(tmp_path))
    for name in ("model.safetensors", *TOKENIZER_FILES):
        assert same_bytes(os.path.join(again, name), os.path.join(tiny_default, name)), name


def test_readme_sft_runs_with_no_arguments(tiny_default, tmp_path):
    """`python tulu.py sft` as README gives it (with --max-steps, to be quick):
    the tiny default (found in the cache) and data/, QLoRA, output in out/sft-qlora,
    then a few held-out prompts with the model's answers."""
    p = run("sft", "--max-steps", 3, cwd=tmp_path)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    out = tmp_path / "out" / "sft-qlora"
    assert {*ADAPTER_FILES, *TOKENIZER_FILES, "metrics.jsonl"} <= set(os.listdir(out))
    assert len(metrics(out)) == 3
    with open(out / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == tiny_default
    with open(os.path.join(DATA, "sft_heldout.jsonl")) as f:
        first_prompt = next(m["content"] for m in json.loads(next(f))["messages"] if m["role"] == "user")
    assert first_prompt in p.stdout  # the held-out prompts and the model's answers
    assert re.search(r"exact match, greedy, on the first 40 conversations of .*: SFT [01]\.\d\d\n", p.stdout)
