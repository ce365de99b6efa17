"""Runs that survive: checkpoints that resume exactly, Ctrl-C and SIGTERM, metrics.jsonl
and loss.svg, and the Run object that tulu.py's training loop calls once per step.

A checkpoint (out/checkpoint/) holds the trainable weights, the optimiser state and the
random state after a completed step, as safetensors plus a JSON skeleton (no pickle),
and trainer_state.json with the step and the run's record: the settings, the global
batch, and the model, adapter and data by content (run_record). --resume refuses a
checkpoint whose record differs, with one line naming the difference, before the model
loads; a finished run leaves finished.json and exits at once when resumed.

On disk, out/checkpoint/ is whole whenever a kill comes: save_checkpoint writes
out/checkpoint.tmp/, its trainer_state.json last, then settle_checkpoint makes the
newest whole one out/checkpoint/ and removes the rest; a folder without
trainer_state.json is never read. A kill while the new one is written leaves the old
one; once it is written, the new one, under either name (the next save or --resume
settles them). A finished run leaves finished.json instead.

Under torchrun every rank takes part in gathering FSDP's shards and rank 0 alone
writes; the ranks decide together, once a step, whether to save or stop (any_rank).

Why both kinds of checkpoint: a scheduler's SIGTERM (Slurm, Kubernetes, torchrun passing
it on) is followed by a kill after a grace period (Slurm's KillWait, Kubernetes'
terminationGracePeriodSeconds, torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT: often 30 s).
When the step in progress and a checkpoint fit in it, nothing is lost; where they do not
(raise the grace period), and after a SIGKILL or a lost machine, the last periodic
checkpoint (--save-minutes) remains.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import threading
import time

import torch
from tqdm import tqdm

from llama import TuluError, atomic_write, write_json
from machinery.checks import check_finite_weights, json_safe, stop_if_diverged
from machinery.distributed import (MemoryLog, all_sum, any_rank, dist_of, gathered, placed, placed_state, rank0,
                                   together, whole)


CHECKPOINT, FINISHED, STATE = "checkpoint", "finished.json", "trainer_state.json"


def pack(obj, tensors, path="s"):
    """Split a nested state (dicts, lists, tensors, numbers) into a JSON skeleton
    and a flat dict of tensors for safetensors: resume state without pickle."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):
        return {"dict": [[k, pack(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list": [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    return {"value": obj}


def unpack(o, tensors):
    if "tensor" in o:
        return tensors[o["tensor"]]
    if "dict" in o:
        return {k: unpack(v, tensors) for k, v in o["dict"]}
    if "list" in o:
        return [unpack(v, tensors) for v in o["list"]]
    return o["value"]


def rng_state():
    """The random state a resumed run continues from: the CPU's and this process's GPU's
    alone (each torchrun rank saves none of its own: see next_step), so that a run
    saved on 8 GPUs resumes on 4, or under another CUDA_VISIBLE_DEVICES."""
    cuda = torch.cuda.is_initialized()  # a --device cpu run never creates a CUDA context for this
    return {"cpu": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state()] if cuda else []}


def set_rng_state(rng):
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"][0])  # this process's GPU (checkpoints of old kept one per GPU)


PIECE = 1 << 16  # bytes of each piece a large file's fingerprint reads


@functools.lru_cache(maxsize=None)
def file_digest(path, size, mtime_ns, sampled) -> str:
    """sha256 of a file's bytes, or with `sampled`, of 16 pieces of 64 KiB spread
    evenly over it: a 140 GB model is told from another in a second (a fine-tuned
    weight differs in every piece). size and mtime_ns make the cache forget a changed file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if not sampled or size <= 16 * PIECE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            for i in range(16):
                f.seek((size - PIECE) * i // 15)
                h.update(f.read(PIECE))
    return h.hexdigest()


def fingerprint(path) -> dict:
    """What a run read, by content: a data file whole (its size and sha256); a model or
    adapter folder by its configs, tokenizer and weights, large files sampled."""
    digest = lambda p, sampled: file_digest(p, os.path.getsize(p), os.stat(p).st_mtime_ns, sampled)
    if os.path.isfile(path):
        return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": digest(path, False)[:12]}
    names = sorted(n for n in os.listdir(path) if n.endswith((".json", ".safetensors", ".bin", ".model"))
                   and n != FINISHED and os.path.isfile(os.path.join(path, n)))
    h = hashlib.sha256("".join(f"{n} {digest(os.path.join(path, n), True)}\n" for n in names).encode())
    return {"path": os.path.abspath(path), "sha256": h.hexdigest()[:12]}


def run_record(args, examples=None, total=None) -> dict:
    """What a resumed run must share with its checkpoint to continue the same loss curve:
    the recipe, the global batch, and the model, adapter and data by content (a folder
    that moved is the same; a file changed in place is not). examples and total are
    known once the data is read; before that (check_resume) the rest is compared."""
    keys = ["command", "method", "lr", "warmup_ratio", "seed", "max_seq_length", "max_grad_norm", "weight_decay",
            "adam_eps", "beta", "loss", "label_smoothing"]
    if args.method != "full":  # an --adapter brings its own rank and alpha
        keys += ["lora_dropout"] + ([] if getattr(args, "adapter", None) else ["lora_r", "lora_alpha"])
    run = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    run.update(global_batch=args.batch_size * args.grad_accum * dist_of(args).world, adam_betas=list(args.adam_betas))
    run.update({k: fingerprint(getattr(args, k)) for k in ("model", "adapter", "data") if getattr(args, k, None)})
    return run if examples is None else {**run, "total_steps": total, "examples": examples}


def differences(saved: dict, run: dict) -> str:
    """'key: then -> now; ...' for each setting of `run` that the checkpoint recorded
    otherwise (settings it does not record, written by an older tulu, are not compared).
    Files are compared by content, and named by path and hash."""
    show = lambda v: (f"{v['path']} ({v['bytes']} bytes, sha256 {v['sha256']})" if "bytes" in v else
                      f"{v['path']} (sha256 {v['sha256']})") if isinstance(v, dict) else v
    same = lambda a, b: a.get("sha256") == b.get("sha256") if isinstance(a, dict) and isinstance(b, dict) else a == b
    return "; ".join(f"{k}: {show(saved[k])} -> {show(v)}" for k, v in run.items()
                     if k in saved and not same(saved[k], v))


def read_state(path):
    """The JSON object in `path`, or None where there is none (or half of one)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def discard(folder):
    """Remove a checkpoint folder, its trainer_state.json first: a kill halfway leaves a
    folder that is never taken for a whole checkpoint."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, STATE))
    shutil.rmtree(folder, ignore_errors=True)


def sync(path):
    """Flush a file's or a folder's entries to disk, so that a machine that crashes (not
    only a killed process) still has whole checkpoints."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle_checkpoint(root) -> str | None:
    """Make root/checkpoint the newest whole checkpoint among what save_checkpoint may
    leave (checkpoint, checkpoint.tmp*, and earlier versions' checkpoint.old*), remove
    the others, and return its path (None: there is none). The newest is only ever
    renamed, so a kill during this leaves it findable too. Beside finished.json, every
    checkpoint is one that a kill during finish_run left: it goes."""
    final = os.path.join(root, CHECKPOINT)
    names = [n for n in (os.listdir(root) if os.path.isdir(root) else [])
             if n == CHECKPOINT or n.startswith((CHECKPOINT + ".tmp", CHECKPOINT + ".old"))]
    found = sorted(((read_state(os.path.join(root, n, STATE)) or {}).get("step", -1), n != CHECKPOINT, n)
                   for n in names)  # the newest last; at equal steps a new one over checkpoint/
    if not found or found[-1][0] < 0 or os.path.exists(os.path.join(root, FINISHED)):
        for n in names:
            discard(os.path.join(root, n))
        return None
    best = os.path.join(root, found[-1][2])
    if best != final:
        discard(final)
        os.replace(best, final)
        sync(root)
    for _, _, n in found[:-1]:
        if n != CHECKPOINT:
            discard(os.path.join(root, n))
    return final


def save_checkpoint(out, step, model, opt, rng, run):
    """out/checkpoint/: trainable weights, optimiser state and RNG after `step`
    completed steps, written beside the old one and swapped in by rename."""
    from safetensors.torch import save_file
    weights = gathered({n: p for n, p in model.named_parameters() if p.requires_grad})
    optimizer = gathered(opt.state_dict())
    if not rank0():
        return  # under torchrun every rank helps gather FSDP's shards; rank 0 writes
    check_finite_weights(weights.items(), "checkpoint")
    tmp = os.path.join(out, CHECKPOINT + ".tmp")
    discard(tmp)  # a save that a kill cut short
    os.makedirs(tmp)
    save_file({n: w.contiguous() for n, w in weights.items()}, os.path.join(tmp, "trainable.safetensors"))
    tensors = {}
    skeleton = pack({"optimizer": optimizer, "rng": rng}, tensors)
    save_file(tensors, os.path.join(tmp, "state.safetensors"))
    for name in os.listdir(tmp):
        sync(os.path.join(tmp, name))
    write_json(os.path.join(tmp, STATE), {"step": step, "run": run, "state": skeleton})  # last: now it is whole
    sync(os.path.join(tmp, STATE))
    settle_checkpoint(out)


def resume_root(args) -> str:
    """The output folder a run resumes from (--resume names it or its checkpoint/), else --output."""
    path = os.path.normpath(args.resume or args.output)
    return os.path.dirname(path) if os.path.basename(path) == CHECKPOINT else path


def check_resume(args, root):
    """Before the model loads. --resume of a finished run: say so, exit 0, retrain
    nothing; of a run made with other settings, or of nothing: a one-line error. A new
    run refuses an --output holding an unfinished run's checkpoint, the work it would lose."""
    finished, state = read_state(os.path.join(root, FINISHED)), read_state(os.path.join(root, CHECKPOINT, STATE))
    ckpt = os.path.join(root, CHECKPOINT)
    if not args.resume:
        if state and not finished:
            raise TuluError(f"{ckpt}: {args.output} holds an unfinished run (checkpoint of step {state['step']}): "
                            f"continue it with --resume {args.output}, or choose another --output")
        return
    if finished:
        changed = differences(finished["run"], run_record(args))
        if changed:
            raise TuluError(f"{os.path.join(root, FINISHED)}: that run finished, with other settings ({changed}); "
                            f"start a new run with another --output")
        if dist_of(args).main:
            print(f"{root}: the run finished all {finished['step']} steps ({FINISHED}): nothing to resume")
        sys.exit(0)
    if not state:
        raise TuluError(f"{args.resume}: no checkpoint to resume from ({CHECKPOINT}/{STATE} missing)")
    changed = differences(state["run"], run_record(args))
    if changed:
        raise TuluError(f"{ckpt}: the checkpoint was made with other settings ({changed})")


def load_checkpoint(path, model, opt, run) -> int:
    """Restore what save_checkpoint wrote; returns the number of completed steps.
    `run` (run_record) must be the one the checkpoint was made with, or the resumed run
    would not continue the same curve."""
    from safetensors.torch import load_file
    ckpt = path if os.path.exists(os.path.join(path, STATE)) else os.path.join(path, CHECKPOINT)
    meta = read_state(os.path.join(ckpt, STATE))
    if meta is None:
        raise TuluError(f"{path}: no checkpoint to resume from ({STATE} missing)")
    changed = differences(meta["run"], run)
    if changed:
        raise TuluError(f"{ckpt}: the checkpoint was made with other settings ({changed})")
    weights = load_file(os.path.join(ckpt, "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if weights.keys() != params.keys():
        raise TuluError(f"{ckpt}: its trainable weights do not match this model and --method")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(placed(weights[n], p))
    state = unpack(meta["state"], load_file(os.path.join(ckpt, "state.safetensors")))
    opt.load_state_dict(placed_state(state["optimizer"], opt))
    set_rng_state(state["rng"])
    print(f"resumed from {ckpt} after step {meta['step']}")
    return meta["step"]


def finish_run(out, step, run):
    """After the outputs are written: finished.json records the run, then its checkpoint
    goes (a kill between the two leaves both: settle_checkpoint removes it)."""
    write_json(os.path.join(out, FINISHED), {"step": step, "run": run})
    discard(os.path.join(out, CHECKPOINT))


def forget_finished(out):
    """A run starts writing to `out`: an earlier run's finished.json there goes, so that
    --resume never takes one run for the other."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, FINISHED))


def loss_svg(rows, title) -> str:
    """A line chart of metrics.jsonl rows as SVG text, no plotting library: loss
    against step on the left axis, and for DPO rewards/accuracy (0..1) on the right."""
    W, H, L, R, T, B = 640, 360, 60, 60, 30, 45  # size and margins
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y1 = max((v for v in loss if v is not None), default=1.0) * 1.05 or 1.0  # null: a non-finite step
    X = lambda s: L + (s - x0) / (x1 - x0) * (W - L - R)
    Y = lambda v, top: H - B - v / top * (H - T - B)
    line = lambda vals, top, color: (f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                                     + " ".join(f"{X(s):.1f},{Y(v, top):.1f}" for s, v in zip(steps, vals)
                                                if v is not None) + '"/>')
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
           f'<path d="M{L},{T} V{H - B} H{W - R}" fill="none" stroke="black"/>',
           f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">optimizer step</text>',
           f'<text transform="translate(16,{H / 2}) rotate(-90)" text-anchor="middle" fill="#1f77b4">loss</text>']
    for i in range(5):  # ticks: 5 on each axis
        v, s = y1 * i / 4, x0 + (x1 - x0) * i / 4
        out += [f'<text x="{L - 6}" y="{Y(v, y1) + 4:.1f}" text-anchor="end">{v:.2f}</text>',
                f'<text x="{X(s):.1f}" y="{H - B + 16}" text-anchor="middle">{s:.0f}</text>']
    out.append(line(loss, y1, "#1f77b4"))
    out += [f'<path d="M{X(s):.1f},{T} V{H - B}" stroke="#d62728" stroke-dasharray="4 3"/>'  # json_safe marked it
            f'<text x="{X(s) - 4:.1f}" y="{T + 12}" text-anchor="end" fill="#d62728">non-finite</text>'
            for s, r in zip(steps, rows) if "nonfinite" in r]
    if "rewards/accuracy" in rows[0]:
        out += [f'<path d="M{W - R},{T} V{H - B}" stroke="black"/>', line([r["rewards/accuracy"] for r in rows], 1.0, "#d62728"),
                f'<text transform="translate({W - 16},{H / 2}) rotate(90)" text-anchor="middle" fill="#d62728">'
                f'rewards/accuracy</text>']
        out += [f'<text x="{W - R + 6}" y="{Y(v, 1.0) + 4:.1f}">{v:.1f}</text>' for v in (0, 0.5, 1.0)]
    return "\n".join(out + ["</svg>\n"])


class MetricsLog:
    """metrics.jsonl, one JSON object per step; on resume, later lines are dropped, and
    so is a last line that a kill cut short (it has no newline)."""

    def __init__(self, out, start_step):
        self.path = os.path.join(out, "metrics.jsonl")
        rows = []
        if start_step and os.path.exists(self.path):
            with open(self.path) as f:
                rows = [r for r in (json.loads(line) for line in f if line.endswith("\n")) if r["step"] <= start_step]
        self.rows = rows
        atomic_write(self.path, lambda tmp: pathlib.Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def log(self, row):
        row = json_safe(row)
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, title):
        """loss.svg beside metrics.jsonl, at each checkpoint and at the end."""
        if self.rows:
            svg = loss_svg(self.rows, title)
            atomic_write(os.path.join(os.path.dirname(self.path), "loss.svg"), lambda tmp: pathlib.Path(tmp).write_text(svg))


class Run:
    """What a training run does besides the recipe, called by the loop once per step:
    metrics.jsonl and loss.svg, a checkpoint every --save-every steps or --save-minutes
    and after Ctrl-C or SIGTERM (then exit 130), the stop at a non-finite step, --resume.
    While it runs (`with run:`), Ctrl-C and SIGTERM (a scheduler's preemption) only raise
    d.stop, so a run never stops inside an optimiser step; a second Ctrl-C stops at once,
    without saving. Under torchrun the ranks decide each step together (any_rank), the
    signal handlers are setup_distributed's, and rank 0 alone writes."""

    def __init__(self, args, out, record, total, per_epoch):
        self.args, self.out, self.record, self.total, self.per_epoch = args, out, record, total, per_epoch
        self.d, self.since, self.old = dist_of(args), time.monotonic(), {}
        name = os.path.basename(os.path.normpath(getattr(args, "model", None) or out))
        self.title = f"tulu {args.command} --method {args.method}: {name}"

    def resume(self, model, opt) -> int:
        """The steps already done: those of the --resume checkpoint, restored into model
        and opt; else 0."""
        a = self.args
        self.start = together(self.d, load_checkpoint, a.resume, model, opt, self.record) if a.resume else 0
        self.saved = self.start if a.resume else None  # the step of the newest checkpoint
        if self.d.main:
            forget_finished(self.out)
        self.log = MetricsLog(self.out, self.start) if self.d.main else MemoryLog()
        return self.start

    def steps(self):
        """The steps left, under a tqdm bar. Under torchrun each step first reseeds dropout from
        (seed, step, rank): ranks draw different masks, and a resumed run the same ones."""
        self.bar = tqdm(range(self.start, self.total), initial=self.start, total=self.total,
                        desc=self.args.command, dynamic_ncols=True)
        for step in self.bar:
            if self.d.world > 1:
                torch.manual_seed(hash((self.args.seed, step, self.d.rank)))
            self.t0, self.sums, self.metrics = time.time(), [0.0, 0], {}  # loss, tokens; the task's sums
            yield step
        self.bar.close()

    def add(self, loss, metrics, batch):
        """A micro-batch's share of the step's row (a stand-in, of weight 0, adds nothing)."""
        w = batch.get("weight", 1)
        self.sums[0] += loss.item() * w
        self.sums[1] += int(batch["attention_mask"].sum()) * w
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v * w

    def finite(self, norm, denom) -> bool:
        """Whether the step may be applied: its loss and gradient norm, summed over the ranks
        (under FSDP the whole gradient's norm), are finite; so every rank decides alike. A
        non-finite step is never applied, and end_step stops the run on its row."""
        norm = float(whole(norm))
        loss, tokens, *totals = all_sum(self.d, *self.sums, *self.metrics.values())
        metrics = {k: v / denom for k, v in zip(self.metrics, totals)}
        self.row = {"loss": loss, "grad_norm": norm, "tokens": int(tokens), **metrics}
        return math.isfinite(loss) and math.isfinite(norm)

    def end_step(self, step, model, opt, lr):
        """After `step` steps: log the row, stop on a non-finite one, then checkpoint when due
        or asked to stop (not after the last step: the outputs come next, and a signal waits
        for them)."""
        row = {"step": step, "epoch": round(step / self.per_epoch, 3), "lr": lr, **self.row,
               "tokens_per_s": round(self.row["tokens"] / (time.time() - self.t0), 1)}
        self.log.log(row)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        stop_if_diverged(row, self.args, self.out, self.log, self.title)
        if step == self.total:
            return
        stop, due = any_rank(self.d, self.d.stop, self.save_due(step))
        if due or stop:
            together(self.d, save_checkpoint, self.out, step, model, opt, rng_state(), self.record)
            self.log.plot(self.title)
            self.saved, self.since = step, time.monotonic()
            stop = stop or any_rank(self.d, self.d.stop)[0]  # a SIGTERM during the save: no step more
        if stop:
            self.bar.close()
            if self.d.main:
                print(f"\ninterrupted: {step} steps are saved in {self.out}/{CHECKPOINT}; continue with "
                      f"--resume {self.out}", file=sys.stderr)
            sys.exit(130)

    def save_due(self, step) -> bool:
        a = self.args
        minutes = a.save_minutes and time.monotonic() - self.since >= 60 * a.save_minutes
        return bool(a.save_every and step % a.save_every == 0 or minutes)

    def finish(self, model, save=None) -> list[dict]:
        """After the last step: the chart, then save() writes the outputs (still under the
        signal handlers: a SIGTERM now waits for whole outputs), then finished.json."""
        self.log.plot(self.title)
        model.eval()
        if save is not None:
            save()
            if self.d.main:
                finish_run(self.out, self.total, self.record)
        return self.log.rows

    def on_signal(self, sig, frame):
        if self.d.stop and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.d.stop = True
        os.write(2, f"\n{signal.Signals(sig).name}: stopping after this step "
                    f"(Ctrl-C again: at once, without saving)\n".encode())

    def __enter__(self):
        if self.d.world == 1 and threading.current_thread() is threading.main_thread():
            self.d.stop = False
            self.old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, e, tb):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        if self.old:
            self.d.stop = False
        if kind is KeyboardInterrupt:  # a second Ctrl-C, maybe inside an optimiser step: nothing more is saved
            self.bar.close()
            kept = (f"the checkpoint of step {self.saved} stays; continue with --resume {self.out}"
                    if self.saved is not None else "no checkpoint was written")
            print(f"\nstopped at once: {kept}", file=sys.stderr)
            sys.exit(130)
