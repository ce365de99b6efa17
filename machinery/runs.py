"""Runs that survive: checkpoints that resume exactly, Ctrl-C and SIGTERM, metrics.jsonl
and loss.svg, all kept by the Run object that tulu.py's training loop calls once a step.

A checkpoint (out/checkpoint/) holds the trainable weights, the optimiser state and the
random state after a completed step (safetensors and a JSON skeleton: no pickle), and
trainer_state.json with the step and the run's record: the settings, the global batch,
and the model, adapter and data by content (run_record). --resume refuses a checkpoint
whose record differs, in one line naming the difference, before the model loads. A
finished run leaves finished.json instead, and its --resume exits at once.

out/checkpoint/ is whole whenever a kill comes: save_checkpoint writes checkpoint.tmp/,
its trainer_state.json last (a folder without one is never read), then settle_checkpoint
renames the newer whole one to checkpoint/ and removes the other; a kill anywhere leaves
a whole one under either name, which the next save or --resume settles.
Under torchrun every rank helps gather FSDP's shards, rank 0 alone writes, and the ranks
decide together, once a step, whether to save or stop (any_rank).

Why both kinds of checkpoint: a scheduler's SIGTERM (Slurm, Kubernetes, torchrun passing
it on) is followed by a kill after a grace period (Slurm's KillWait, Kubernetes'
terminationGracePeriodSeconds, torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT: often 30 s).
When the step in progress and a checkpoint fit in it, nothing is lost; where they do not
(raise the grace period), and after a SIGKILL or a lost machine, the last periodic
checkpoint (--save-minutes) remains.
"""
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
from machinery.distributed import (all_sum, any_rank, dist_of, gathered, placed, placed_state, rank0,
                                   together, whole)

CHECKPOINT, FINISHED, STATE = "checkpoint", "finished.json", "trainer_state.json"


def pack(obj, tensors, path="s"):
    """A nested state (dicts, lists, tensors, numbers) as a JSON skeleton, its tensors put
    in `tensors` for safetensors (unpack reverses it): resume state without pickle."""
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
    return [unpack(v, tensors) for v in o["list"]] if "list" in o else o["value"]


def rng_state():
    """The CPU's random state and this process's GPU's alone (ranks keep none of their own:
    Run.steps), so that a run saved on 8 GPUs resumes on 4 or under another CUDA_VISIBLE_DEVICES."""
    cuda = torch.cuda.is_initialized()  # a --device cpu run never creates a CUDA context for this
    return {"cpu": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state()] if cuda else []}


def set_rng_state(rng):
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"][0])


@functools.lru_cache(maxsize=None)  # size and mtime_ns in the key: a changed file is read again
def file_digest(path, size, mtime_ns, sampled, piece=1 << 16) -> str:
    """sha256 of a file, or with `sampled` of 16 pieces of 64 KiB spread over it: a 140 GB
    model is told from another in a second (a fine-tuned weight differs in every piece)."""
    h, spread = hashlib.sha256(), sampled and size > 16 * piece
    starts = [(size - piece) * i // 15 for i in range(16)] if spread else range(0, size, piece)
    with open(path, "rb") as f:
        for start in starts:
            f.seek(start)
            h.update(f.read(piece))
    return h.hexdigest()


def fingerprint(path) -> dict:
    """What a run read, by content: a data file whole (its size and sha256); a model or
    adapter folder by its configs, tokenizer and weights, large files sampled."""
    digest = lambda p, sampled: file_digest(p, os.path.getsize(p), os.stat(p).st_mtime_ns, sampled)
    found = {"path": os.path.abspath(path)}
    if os.path.isfile(path):
        return {**found, "bytes": os.path.getsize(path), "sha256": digest(path, False)[:12]}
    names = sorted(n for n in os.listdir(path) if n.endswith((".json", ".safetensors", ".bin", ".model"))
                   and n != FINISHED and os.path.isfile(os.path.join(path, n)))
    listing = "".join(f"{n} {digest(os.path.join(path, n), True)}\n" for n in names)
    return {**found, "sha256": hashlib.sha256(listing.encode()).hexdigest()[:12]}


def run_record(args, examples=None, total=None) -> dict:
    """What a resumed run must share with its checkpoint to continue the same loss curve:
    the recipe, the global batch, and the model, adapter and data by content (a folder that
    moved is the same; a file changed in place is not); examples and total once the data is read."""
    keys = ["command", "method", "lr", "lr_scheduler", "warmup_ratio", "seed", "max_seq_length",
            "max_grad_norm", "weight_decay", "adam_eps", "beta", "loss", "label_smoothing", "source_max_len",
            "target_max_len", "train_on_source"]
    if args.method != "full":  # an --adapter brings its own rank and alpha
        keys += ["lora_dropout"] + ([] if getattr(args, "adapter", None) else ["lora_r", "lora_alpha"])
    run = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    run.update(global_batch=args.batch_size * args.grad_accum * dist_of(args).world,
               adam_betas=list(args.adam_betas))
    run.update({k: fingerprint(getattr(args, k)) for k in ("model", "adapter", "data")
                if getattr(args, k, None)})
    return run if examples is None else {**run, "total_steps": total, "examples": examples}


def differences(saved: dict, run: dict) -> str:
    """'key: then -> now; ...' for each setting of `run` that the checkpoint recorded
    otherwise (one it does not record, of another --method, is not compared); files by content."""
    def show(v):
        if not isinstance(v, dict):
            return v
        size = f"{v['bytes']} bytes, " if "bytes" in v else ""
        return f"{v['path']} ({size}sha256 {v['sha256']})"
    key = lambda v: v.get("sha256") if isinstance(v, dict) else v
    return "; ".join(f"{k}: {show(saved[k])} -> {show(v)}" for k, v in run.items()
                     if k in saved and key(saved[k]) != key(v))


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
    """Flush a file or a folder's entries to disk: after a crash of the machine, not only
    of the process, the checkpoint is whole too."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def settle_checkpoint(root) -> str | None:
    """Make root/checkpoint the newer whole one of checkpoint/ and checkpoint.tmp/ (only ever
    renamed: a kill during this leaves it findable), remove the other, return its path or
    None. Beside finished.json, a checkpoint is one that a kill during Run.finish left: it goes."""
    final, tmp = os.path.join(root, CHECKPOINT), os.path.join(root, CHECKPOINT + ".tmp")
    old, new = ((read_state(os.path.join(f, STATE)) or {}).get("step", -1) for f in (final, tmp))
    if max(old, new) < 0 or os.path.exists(os.path.join(root, FINISHED)):
        discard(final)
        discard(tmp)
        return None
    if new < old:
        discard(tmp)
        return final
    discard(final)  # at equal steps too: the new one
    os.replace(tmp, final)
    sync(root)
    return final


def save_checkpoint(out, step, model, opt, rng, run):
    """out/checkpoint/: trainable weights, optimiser state and RNG after `step` completed
    steps, written beside the old one and swapped in by rename."""
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
    write_json(os.path.join(tmp, STATE), {"step": step, "run": run, "state": skeleton})  # now it is whole
    sync(os.path.join(tmp, STATE))
    settle_checkpoint(out)


def resume_root(args) -> str:
    """The output folder a run resumes from (--resume names it or its checkpoint/), else --output."""
    path = os.path.normpath(args.resume or args.output)
    return os.path.dirname(path) if os.path.basename(path) == CHECKPOINT else path


def check_resume(args, root):
    """Before the model loads. --resume of a finished run: say so, exit 0, retrain nothing;
    of a run made with other settings, or of nothing: a one-line error. A new run refuses
    an --output holding an unfinished run's checkpoint, the work it would lose."""
    ckpt, done = os.path.join(root, CHECKPOINT), os.path.join(root, FINISHED)
    finished, state = read_state(done), read_state(os.path.join(ckpt, STATE))
    if not args.resume:
        if state and not finished:
            raise TuluError(f"{ckpt}: {args.output} holds an unfinished run (checkpoint of step "
                            f"{state['step']}): continue it with --resume {args.output}, "
                            f"or choose another --output")
        return
    if finished:
        changed = differences(finished["run"], run_record(args))
        if changed:
            raise TuluError(f"{done}: that run finished, with other settings ({changed}); "
                            f"start a new run with another --output")
        if rank0():
            print(f"{root}: the run finished all {finished['step']} steps ({FINISHED}): nothing to resume")
        sys.exit(0)
    if not state:
        raise TuluError(f"{args.resume}: no checkpoint to resume from ({CHECKPOINT}/{STATE} missing)")
    changed = differences(state["run"], run_record(args))
    if changed:
        raise TuluError(f"{ckpt}: the checkpoint was made with other settings ({changed})")


def load_checkpoint(path, model, opt, run) -> int:
    """Restore what save_checkpoint wrote (check_resume found it) into model and opt; return
    its step. `run`, now with the data, must be the checkpoint's, or the curve would not continue."""
    from safetensors.torch import load_file
    ckpt = path if os.path.exists(os.path.join(path, STATE)) else os.path.join(path, CHECKPOINT)
    meta = read_state(os.path.join(ckpt, STATE))
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


def loss_svg(rows, title) -> str:
    """A line chart of metrics.jsonl rows as SVG text, no plotting library: loss
    against step on the left axis, and for DPO rewards/accuracy (0..1) on the right."""
    W, H, L, R, T, B = 640, 360, 60, 60, 30, 45  # size and margins
    blue, red = "#1f77b4", "#d62728"
    steps = [r["step"] for r in rows]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    losses = [r["loss"] for r in rows if r["loss"] is not None]  # None: a non-finite step
    y1 = max(losses, default=1.0) * 1.05 or 1.0
    X = lambda s: L + (s - x0) / (x1 - x0) * (W - L - R)
    Y = lambda v, top: H - B - v / top * (H - T - B)

    def line(key, top, color):
        points = " ".join(f"{X(r['step']):.1f},{Y(r[key], top):.1f}" for r in rows if r[key] is not None)
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>'
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
           f'<path d="M{L},{T} V{H - B} H{W - R}" fill="none" stroke="black"/>',
           f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">optimizer step</text>',
           f'<text transform="translate(16,{H / 2}) rotate(-90)" text-anchor="middle" fill="{blue}">'
           f'loss</text>']
    for i in range(5):  # ticks: 5 on each axis
        v, s = y1 * i / 4, x0 + (x1 - x0) * i / 4
        out += [f'<text x="{L - 6}" y="{Y(v, y1) + 4:.1f}" text-anchor="end">{v:.2f}</text>',
                f'<text x="{X(s):.1f}" y="{H - B + 16}" text-anchor="middle">{s:.0f}</text>']
    out.append(line("loss", y1, blue))
    out += [f'<path d="M{X(s):.1f},{T} V{H - B}" stroke="{red}" stroke-dasharray="4 3"/>'
            f'<text x="{X(s) - 4:.1f}" y="{T + 12}" text-anchor="end" fill="{red}">non-finite</text>'
            for s, r in zip(steps, rows) if "nonfinite" in r]  # json_safe marked it
    if "rewards/accuracy" in rows[0]:
        out += [f'<path d="M{W - R},{T} V{H - B}" stroke="black"/>', line("rewards/accuracy", 1.0, red),
                f'<text transform="translate({W - 16},{H / 2}) rotate(90)" text-anchor="middle" fill="{red}">'
                f'rewards/accuracy</text>']
        out += [f'<text x="{W - R + 6}" y="{Y(v, 1.0) + 4:.1f}">{v:.1f}</text>' for v in (0, 0.5, 1.0)]
    return "\n".join(out + ["</svg>\n"])


def write_text(path, text):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))


class Run:
    """What a training run does besides the recipe, called by the loop once per step:
    metrics.jsonl and loss.svg, a checkpoint every --save-every steps or --save-minutes
    and after Ctrl-C or SIGTERM (then exit 130), the stop at a non-finite step, --resume.
    While it runs (`with run:`), Ctrl-C and SIGTERM (a scheduler's preemption) only raise
    d.stop, so a run never stops inside an optimiser step; a second Ctrl-C stops at once,
    without saving. Under torchrun the signal handlers are setup_distributed's."""

    def __init__(self, args, out, record, total, per_epoch):
        self.args, self.out, self.record, self.total, self.per_epoch = args, out, record, total, per_epoch
        self.d, self.since, self.old = dist_of(args), time.monotonic(), {}
        name = os.path.basename(os.path.normpath(getattr(args, "model", None) or out))
        self.title = f"tulu {args.command} --method {args.method}: {name}"

    def resume(self, model, opt):
        """Restore the --resume checkpoint, if any, into model and opt; keep metrics.jsonl's rows
        up to its step, none cut short by a kill. An earlier run's finished.json in out goes."""
        resume, self.rows = self.args.resume, []
        self.start = together(self.d, load_checkpoint, resume, model, opt, self.record) if resume else 0
        self.metrics_path = os.path.join(self.out, "metrics.jsonl") if rank0() else None  # others: rows alone
        if self.metrics_path:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.out, FINISHED))
            if self.start and os.path.exists(self.metrics_path):
                with open(self.metrics_path) as f:
                    rows = (json.loads(line) for line in f if line.endswith("\n"))
                    self.rows = [r for r in rows if r["step"] <= self.start]
            write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def steps(self):
        """The steps left, under a tqdm bar. Under torchrun each step first reseeds dropout
        from (seed, step, rank): ranks draw different masks, and a resumed run the same ones."""
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
        """Whether the step may be applied: its loss and gradient norm (FSDP's: the whole
        gradient's), summed over the ranks, are finite, so every rank decides alike."""
        norm = float(whole(norm))
        loss, tokens, *totals = all_sum(self.d, *self.sums, *self.metrics.values())
        metrics = {k: v / denom for k, v in zip(self.metrics, totals)}
        self.row = {"loss": loss, "grad_norm": norm, "tokens": int(tokens), **metrics}
        return math.isfinite(loss) and math.isfinite(norm)

    def plot(self):
        """loss.svg beside metrics.jsonl: at each checkpoint, at a non-finite step and at the end."""
        if self.metrics_path and self.rows:
            write_text(os.path.join(self.out, "loss.svg"), loss_svg(self.rows, self.title))

    def end_step(self, step, model, opt, lr):
        """After `step` steps: log the row, stop on a non-finite one, then checkpoint when due
        or asked to stop (not after the last step: the outputs come next, and a signal waits)."""
        a, row = self.args, {"step": step, "epoch": round(step / self.per_epoch, 3), "lr": lr, **self.row}
        row["tokens_per_s"] = round(row["tokens"] / (time.time() - self.t0), 1)
        self.rows.append(json_safe(row))
        if self.metrics_path:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(self.rows[-1]) + "\n")
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        stop_if_diverged(row, a, self.out, self.plot)
        if step == self.total:
            return
        minutes = a.save_minutes and time.monotonic() - self.since >= 60 * a.save_minutes
        stop, due = any_rank(self.d, self.d.stop, bool(a.save_every and step % a.save_every == 0 or minutes))
        if due or stop:
            together(self.d, save_checkpoint, self.out, step, model, opt, rng_state(), self.record)
            self.plot()
            self.since = time.monotonic()
            stop = stop or any_rank(self.d, self.d.stop)[0]  # a SIGTERM during the save: no step more
        if stop:
            self.bar.close()
            if rank0():
                print(f"\ninterrupted: {step} steps are saved in {self.out}/{CHECKPOINT}; continue with "
                      f"--resume {self.out}", file=sys.stderr)
            sys.exit(130)

    def finish(self, model, save=None) -> list[dict]:
        """After the last step: the chart, then save() writes the outputs (still under the
        signal handlers: a SIGTERM now waits for whole outputs), then finished.json records
        the run and its checkpoint goes (a kill between the two: settle_checkpoint removes it)."""
        self.plot()
        model.eval()
        if save is not None:
            save()
            if rank0():
                write_json(os.path.join(self.out, FINISHED), {"step": self.total, "run": self.record})
                discard(os.path.join(self.out, CHECKPOINT))
        return self.rows

    def on_signal(self, sig, frame):
        if self.d.stop and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.d.stop = True
        os.write(2, f"\n{signal.Signals(sig).name}: stopping after this step "
                    f"(Ctrl-C again: at once, without saving)\n".encode())

    def __enter__(self):
        if self.d.world == 1 and threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, e, tb):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        if self.old:
            self.d.stop = False
        if kind is KeyboardInterrupt:  # a second Ctrl-C, perhaps inside an optimiser step: nothing more saved
            self.bar.close()
            saved = read_state(os.path.join(self.out, CHECKPOINT, STATE))
            kept = (f"the checkpoint of step {saved['step']} stays; continue with --resume {self.out}"
                    if saved else "no checkpoint was written")
            print(f"\nstopped at once: {kept}", file=sys.stderr)
            sys.exit(130)
