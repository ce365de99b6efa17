"""Preemption and crashes, as clusters deliver them to `python tulu.py sft|dpo`, and
--resume: SIGTERM (a scheduler's preemption: finish the step in progress, checkpoint,
exit 130), SIGKILL (nothing of the process runs on: --resume takes the last periodic
checkpoint), a kill in the middle of a checkpoint's write (the previous whole one stays
readable), --resume of another run (one line naming the difference) and of a finished
run (exit 0, nothing retrained).

A resumed run must continue the uninterrupted one: it reloads the weights, AdamW's
state and the random state exactly, then does the same arithmetic in the same order,
so its losses and adapter equal the uninterrupted run's (1e-5 leaves room for nothing
but a different summation order, which would already be a bug of ours). Runs are
tiny: hf_tiny, QLoRA with LoRA dropout 0.1 (so the random state matters), 2
micro-batches a step. Signals come from inside the process at a chosen micro-batch
(tests/dist_worker.py), so the step they hit is the same on every machine.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import tulu
from machinery import runs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = os.path.join(HERE, "fixtures", "cli")
HF_TINY = os.path.join(FIX, "hf_tiny")
WORKER = os.path.join(HERE, "dist_worker.py")
TULU = os.path.join(ROOT, "tulu.py")
ADAPTER = "adapter_model.safetensors"


def sft_flags(data, out, steps=6, *extra):
    return ["sft", "--model", HF_TINY, "--data", data, "--max-seq-length", 128, "--lora-r", 8, "--seed", 0,
            "--max-steps", steps, "--lr", 1e-3, "--batch-size", 2, "--grad-accum", 2, "--output", out, *extra]


def cli(*argv):
    tulu.main([str(a) for a in argv])


def run(*argv, **fault):
    """`python tulu.py ARGV` in a process of its own; with fault (TULU_TEST_*), through
    tests/dist_worker.py, which sends the process a signal at a given micro-batch."""
    env = {**os.environ, **{k: str(v) for k, v in fault.items()}}
    cmd = [sys.executable, WORKER if fault else TULU, *map(str, argv)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(), p.stderr.decode())


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_step(out):
    with open(os.path.join(out, "checkpoint", "trainer_state.json")) as f:
        return json.load(f)["step"]


def assert_continues(out, full):
    """out's curve, every step once, and adapter are those of the uninterrupted run; its
    checkpoint is gone (the run finished) and no half-written one is left behind."""
    rows, want = metrics(out), metrics(full)
    assert [r["step"] for r in rows] == [r["step"] for r in want]
    for a, b in zip(rows, want):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
    got, ref = load_file(os.path.join(out, ADAPTER)), load_file(os.path.join(full, ADAPTER))
    assert got.keys() == ref.keys() and all(torch.allclose(got[k], ref[k], atol=1e-5, rtol=0) for k in ref)
    assert [n for n in os.listdir(out) if n.startswith("checkpoint")] == []
    with open(os.path.join(out, "finished.json")) as f:
        assert json.load(f)["step"] == len(want)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with open(os.path.join(ROOT, "data", "sft_train.jsonl")) as f:
        (d / "sft.jsonl").write_text("".join(next(f) for _ in range(16)))
    with open(os.path.join(ROOT, "data", "prefs_train.jsonl")) as f:
        (d / "prefs.jsonl").write_text("".join(next(f) for _ in range(8)))
    return d


@pytest.fixture(scope="module")
def full(data, tmp_path_factory):
    """The uninterrupted runs, 6 and 7 steps."""
    outs = {}
    for steps in (6, 7):
        outs[steps] = tmp_path_factory.mktemp(f"full{steps}")
        cli(*sft_flags(data / "sft.jsonl", outs[steps], steps))
    return outs


# -----------------------------------------------------------------------------
# SIGTERM and SIGKILL, in a process of its own


def test_sigterm_stops_after_the_step_and_resume_continues(tmp_path, data, full):
    """SIGTERM during step 4's second micro-batch: step 4 completes, its checkpoint is
    written, the process exits 130 with the --resume hint and no traceback."""
    out = tmp_path / "out"
    p = run(*sft_flags(data / "sft.jsonl", out), TULU_TEST_SIGTERM_AT=2 * 3 + 2)
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    assert "SIGTERM: stopping after this step" in p.stderr
    assert f"interrupted: 4 steps are saved in {out}/checkpoint; continue with --resume {out}" in p.stderr
    assert checkpoint_step(out) == 4 and [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    p = run(*sft_flags(data / "sft.jsonl", out), "--resume", out)
    assert p.returncode == 0, p.stderr
    assert f"resumed from {out}/checkpoint after step 4" in p.stdout
    assert_continues(out, full[6])


def test_sigkill_resumes_from_the_last_periodic_checkpoint(tmp_path, data, full):
    """--save-every 3 writes checkpoints after steps 3 and 6. SIGKILL during step 5: the
    process ends with nothing saved of steps 4 and 5 (metrics.jsonl already holds step 4);
    --resume continues from step 3, and metrics.jsonl ends with every step once."""
    out = tmp_path / "out"
    flags = sft_flags(data / "sft.jsonl", out, 7, "--save-every", 3)
    p = run(*flags, TULU_TEST_SIGKILL_AT=2 * 4 + 1)
    assert p.returncode == -9, p.stderr
    assert checkpoint_step(out) == 3 and [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    p = run(*flags, "--resume", out)
    assert p.returncode == 0, p.stderr
    assert f"resumed from {out}/checkpoint after step 3" in p.stdout
    assert_continues(out, full[7])


# -----------------------------------------------------------------------------
# A kill while a checkpoint is written: the files it leaves, made in this process by
# stopping save_checkpoint at a chosen point of the save of step 4. The checkpoint of
# step 2 is whole; resume must take the newest whole one.


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, and no clean-up of ours runs."""


def kill_during_save_of_step_4(monkeypatch, where):
    import llama
    write_json, write_safetensors = runs.write_json, llama.write_safetensors

    def save(path, tensors, *a, **kw):
        write_safetensors(path, tensors, *a, **kw)
        if path.endswith("state-4.safetensors") and where == "while its tensors are written":
            os.truncate(path, os.path.getsize(path) // 2)
            raise Killed

    def write(path, obj):
        last = path.endswith("trainer_state.json") and obj["step"] == 4
        if last and where == "before its trainer_state.json":
            raise Killed
        write_json(path, obj)
        if last and where == "after its trainer_state.json":
            raise Killed
    monkeypatch.setattr(llama, "write_safetensors", save)
    monkeypatch.setattr(runs, "write_json", write)


KILLS = {  # where the save of step 4 is killed -> the step a resumed run continues from
    "while its tensors are written": 2,  # trainer_state.json names state-2; state-4 is half written
    "before its trainer_state.json": 2,  # the same, state-4 whole
    "after its trainer_state.json": 4,   # trainer_state.json names state-4; state-2 is not yet removed
}


@pytest.mark.parametrize("where", KILLS)
def test_a_kill_during_a_checkpoint_write_leaves_a_whole_one(tmp_path, monkeypatch, capsys, data, full,
                                                               where):
    out = tmp_path / "out"
    flags = sft_flags(data / "sft.jsonl", out, 6, "--save-every", 2)
    with monkeypatch.context() as m:
        kill_during_save_of_step_4(m, where)
        with pytest.raises(Killed):
            cli(*flags)
    assert sorted(os.listdir(out / "checkpoint")) == ["state-2.safetensors", "state-4.safetensors",
                                                      "trainer_state.json"]  # what the kill left
    capsys.readouterr()
    cli(*flags, "--resume", out)
    assert f"resumed from {out}/checkpoint after step {KILLS[where]}" in capsys.readouterr().out
    assert_continues(out, full[6])


def test_a_kill_while_a_finished_run_removes_its_checkpoint(tmp_path, capsys, data, full, unfinished):
    """finished.json is written before the checkpoint is removed: beside it, what a kill
    left of a checkpoint is never resumed, nor does it refuse a new run."""
    out = tmp_path / "out"
    shutil.copytree(full[6], out)
    shutil.copytree(unfinished["sft"] / "checkpoint", out / "checkpoint")
    with pytest.raises(SystemExit) as e:
        cli(*sft_flags(data / "sft.jsonl", out), "--resume", out)
    assert e.value.code == 0 and "the run finished all 6 steps" in capsys.readouterr().out
    cli(*sft_flags(data / "sft.jsonl", out))
    assert_continues(out, full[6])


# -----------------------------------------------------------------------------
# When checkpoints are written, and what a finished run leaves


def saved_steps(monkeypatch):
    steps, save = [], runs.save_checkpoint
    monkeypatch.setattr(runs, "save_checkpoint",
                        lambda out, step, *a: steps.append(step) or save(out, step, *a))
    return steps


@pytest.mark.parametrize("minutes, want", [(None, []), (1e-9, [1, 2, 3, 4, 5])])
def test_save_minutes_checkpoints_by_time(tmp_path, monkeypatch, data, minutes, want):
    """The default (30 minutes) writes no checkpoint in a run of a second; a period shorter
    than a step writes one before every step but the first (none after the last: the
    outputs follow)."""
    steps = saved_steps(monkeypatch)
    extra = ["--save-minutes", minutes] if minutes else []
    cli(*sft_flags(data / "sft.jsonl", tmp_path / "out", 6, *extra))
    assert steps == want


def test_help_says_how_the_checkpoint_period_is_chosen(capsys):
    with pytest.raises(SystemExit):
        tulu.main(["sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--save-minutes" in text and "default 30" in text and "SIGTERM" in text


def test_resume_of_a_finished_run_exits_0_and_retrains_nothing(tmp_path, monkeypatch, capsys, data, full):
    out = tmp_path / "out"
    shutil.copytree(full[6], out)
    before = (out / ADAPTER).read_bytes()
    monkeypatch.setattr(tulu, "build_policy", lambda *a: pytest.fail("loaded the model of a finished run"))
    with pytest.raises(SystemExit) as e:
        cli(*sft_flags(data / "sft.jsonl", out), "--resume", out)
    assert e.value.code == 0
    want = f"{out}: the run finished all 6 steps (finished.json): nothing to resume"
    assert want in capsys.readouterr().out
    assert (out / ADAPTER).read_bytes() == before and not os.path.exists(out / "checkpoint")


def one_line_error(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(*argv)
    lines = [line for line in capsys.readouterr().err.split("\n") if line.strip()]
    assert e.value.code == 1 and len(lines) == 1, lines
    return lines[0]


def test_a_new_run_refuses_an_unfinished_runs_folder(tmp_path, monkeypatch, capsys, data):
    """Without --resume, an --output that holds an unfinished run's checkpoint is refused:
    starting over there would lose it (a requeued job that forgot --resume)."""
    out = tmp_path / "out"
    stop_at_micro_batch(monkeypatch, 2 * 1 + 1)
    with pytest.raises(SystemExit):
        cli(*sft_flags(data / "sft.jsonl", out))
    line = one_line_error(capsys, sft_flags(data / "sft.jsonl", out))
    assert f"{out}/checkpoint" in line and "step 2" in line and f"--resume {out}" in line
    assert checkpoint_step(out) == 2


# -----------------------------------------------------------------------------
# --resume of another run: one line naming what differs, before the model loads


def stop_at_micro_batch(monkeypatch, n):
    """Ctrl-C at the n-th micro-batch loss (SFT or DPO): the run stops after that step."""
    import signal
    calls = []
    for task in (tulu.SFTTask, tulu.DPOTask):
        def loss(self, *a, _loss=task.loss, **kw):
            calls.append(1)
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGINT)
            return _loss(self, *a, **kw)
        monkeypatch.setattr(task, "loss", loss)


def dpo_flags(data, out, *extra):
    return ["dpo", "--model", HF_TINY, "--adapter", os.path.join(FIX, "sft_lora"), "--method", "lora",
            "--data", data, "--max-seq-length", 128, "--seed", 0, "--max-steps", 4, "--batch-size", 2,
            "--grad-accum", 1, "--lr", 1e-3, "--output", out, *extra]


@pytest.fixture(scope="module")
def unfinished(data, tmp_path_factory):
    """An sft and a dpo run stopped after step 2 of 4: checkpoint/ holds their settings."""
    outs = {"sft": tmp_path_factory.mktemp("sft"), "dpo": tmp_path_factory.mktemp("dpo")}
    with pytest.MonkeyPatch.context() as m:
        stop_at_micro_batch(m, 2 * 1 + 1)
        with pytest.raises(SystemExit):
            cli(*sft_flags(data / "sft.jsonl", outs["sft"], 4))
    with pytest.MonkeyPatch.context() as m:
        stop_at_micro_batch(m, 2)
        with pytest.raises(SystemExit):
            cli(*dpo_flags(data / "prefs.jsonl", outs["dpo"]))
    assert checkpoint_step(outs["sft"]) == checkpoint_step(outs["dpo"]) == 2
    return outs


def other_model(t):
    """hf_tiny with every weight a little changed: another model of the same shape (as a
    fine-tuned one is), whose files have the same names and sizes."""
    d = t / "other_model"
    shutil.copytree(HF_TINY, d)
    w = load_file(d / "model.safetensors")
    save_file({k: (v.float() * 1.01).to(v.dtype) for k, v in w.items()}, d / "model.safetensors",
              metadata={"format": "pt"})
    assert os.path.getsize(d / "model.safetensors") == os.path.getsize(f"{HF_TINY}/model.safetensors")
    return str(d)


def sha256(path):
    """The first 16 hex digits of a file's sha256, as a run records its data."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def edited_data(t, data):
    """The same conversations but one reply edited: a data file changed."""
    d = t / "edited.jsonl"
    lines = (data / "sft.jsonl").read_text().split("\n")
    edited = lines[3].replace('"role":"assistant","content":"', '"role":"assistant","content":"Well, ', 1)
    assert edited != lines[3]
    d.write_text("\n".join(lines[:3] + [edited] + lines[4:]))
    return d


MISMATCHES = {  # name -> (command, flags to change(t, data) -> [(flag, value)], what the line names(t, data))
    "model": ("sft", lambda t, d: [("--model", other_model(t))],
              lambda t, d: [f"model: {HF_TINY} -> {t}/other_model"]),
    "data": ("sft", lambda t, d: [("--data", edited_data(t, d))],
             lambda t, d: [f"data_sha256: {sha256(d / 'sft.jsonl')} -> {sha256(t / 'edited.jsonl')}"]),
    "adapter": ("dpo", lambda t, d: [("--adapter", os.path.join(FIX, "sft_qlora"))],
                lambda t, d: [f"adapter: {FIX}/sft_lora -> {FIX}/sft_qlora"]),
    "beta": ("dpo", lambda t, d: [("--beta", 0.2)], lambda t, d: ["beta: 0.1 -> 0.2"]),
    "loss": ("dpo", lambda t, d: [("--loss", "ipo")], lambda t, d: ["loss: sigmoid -> ipo"]),
}


def changed(argv, flags):
    argv = list(argv)
    for flag, value in flags:
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


@pytest.mark.parametrize("name", MISMATCHES)
def test_resume_of_another_run_is_one_line_naming_the_difference(tmp_path, monkeypatch, capsys, data,
                                                                  unfinished, name):
    command, flags, want = MISMATCHES[name]
    out = str(unfinished[command])
    argv = sft_flags(data / "sft.jsonl", out, 4) if command == "sft" else dpo_flags(data / "prefs.jsonl", out)
    monkeypatch.setattr(tulu, "build_policy", lambda *a: pytest.fail("loaded the model of a refused run"))
    line = one_line_error(capsys, changed(argv, flags(tmp_path, data)) + ["--resume", out])
    want_start = f"tulu {command}: error: {out}/checkpoint: the checkpoint was made with other settings ("
    assert line.startswith(want_start), line
    for w in want(tmp_path, data):
        assert w in line, (w, line)
    assert checkpoint_step(out) == 2  # untouched


def test_data_changed_in_place_is_another_run(tmp_path, capsys, data, unfinished):
    out = tmp_path / "out"
    shutil.copytree(unfinished["sft"], out)
    moved = tmp_path / "sft.jsonl"
    shutil.copyfile(edited_data(tmp_path, data), moved)
    argv = changed(sft_flags(data / "sft.jsonl", out, 4), [("--data", moved)])
    line = one_line_error(capsys, argv + ["--resume", out])
    assert line.endswith(f"(data_sha256: {sha256(data / 'sft.jsonl')} -> {sha256(moved)})"), line


def test_the_data_is_compared_by_content_the_model_by_path(tmp_path, capsys, data, unfinished):
    """The data by its sha256: the same file under another path continues the run. The
    model by its path (a 140 GB model is not read to be compared): a copy is another run."""
    out, model, moved = tmp_path / "out", tmp_path / "model", tmp_path / "sft.jsonl"
    shutil.copytree(unfinished["sft"], out)
    shutil.copytree(HF_TINY, model)
    shutil.copyfile(data / "sft.jsonl", moved)
    argv = changed(sft_flags(data / "sft.jsonl", out, 4), [("--data", moved)]) + ["--resume", out]
    line = one_line_error(capsys, changed(argv, [("--model", model)]))
    assert line.endswith(f"other settings (model: {HF_TINY} -> {model})"), line
    cli(*argv)
    assert "resumed from" in capsys.readouterr().out and [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


def test_a_checkpoint_of_other_weights_is_one_line(tmp_path, capsys, data, unfinished):
    """The record names the model by path: where another model now lies there (or the checkpoint
    holds other weights), resuming stops at the first mismatch, in one line, before any step."""
    out = tmp_path / "out"
    shutil.copytree(unfinished["sft"], out)
    state_file = out / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    weights = dict(state["state"]["dict"])["weights"]["dict"]  # pack's skeleton: [name, value] pairs
    weights[0][0] = weights[0][0].replace("layers.0.", "layers.9.")  # a layer this model lacks
    state_file.write_text(json.dumps(state))
    line = one_line_error(capsys, sft_flags(data / "sft.jsonl", out, 4) + ["--resume", out])
    assert line.endswith("checkpoint: its trainable weights do not match this model and --method"), line
    assert checkpoint_step(out) == 2


def test_resume_of_a_finished_run_with_other_settings_is_one_line(tmp_path, capsys, data, full):
    out = tmp_path / "out"
    shutil.copytree(full[6], out)
    argv = changed(sft_flags(data / "sft.jsonl", out), [("--data", edited_data(tmp_path, data))])
    line = one_line_error(capsys, argv + ["--resume", out])
    assert f"{out}/finished.json: that run finished, with other settings (data_sha256: " in line, line
