"""Runs that survive: checkpoints that resume exactly, Ctrl-C and SIGTERM, metrics.jsonl and
loss.svg, kept by the Run object that tulu.py's training loop calls once a step.

After a completed step, out/checkpoint/ holds state-STEP.safetensors (the trainable weights,
the optimiser and random states; their nesting as JSON: no pickle) and, written last and by
rename, trainer_state.json naming it, with the step and the run's record (the config and
the data's sha256): a kill at any point leaves a whole checkpoint. --resume refuses a record
that differs, naming the difference, before the model loads; a finished run leaves
finished.json instead. Periodic checkpoints (--save-minutes) as well as SIGTERM's: a
scheduler kills after a grace period (often 30 s) that the step in progress and a
checkpoint may not fit in, and a lost machine sends nothing.
"""
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
from dataclasses import fields

import torch
from tqdm import tqdm

from llama import TuluError, atomic_write, write_json
from machinery.checks import check_finite_weights, json_safe
from machinery.distributed import (all_sum, any_rank, dist_of, placed, placed_state, rank0, together, whole,
                                   write_gathered)

CHECKPOINT, FINISHED, STATE = "checkpoint", "finished.json", "trainer_state.json"
# what a resumed run may change: where it writes, how often it saves, what it runs on,
# and how it splits the global batch (on another number of ranks)
MAY_CHANGE = {"output", "resume", "save_every", "save_minutes", "device", "dtype", "num_workers", "compile",
              "gradient_checkpointing", "group_by_length", "batch_size", "grad_accum", "dist"}


def pack(obj, tensors, path="s"):
    """A nested state as a JSON skeleton, its tensors put in `tensors` (unpack reverses it)."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):  # pairs: the optimiser's state has int keys, which JSON makes strings
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


def run_record(args) -> dict:
    """What a resumed run must share with its checkpoint to continue the same loss curve:
    the config but MAY_CHANGE, the global batch, the model and adapter by path and the
    data by content (a data file moved is the same; one changed in place is not)."""
    run = {f.name: getattr(args, f.name) for f in fields(args) if f.name not in MAY_CHANGE | {"data"}}
    run.update({k: os.path.abspath(run[k]) for k in ("model", "adapter") if run.get(k)})
    run["global_batch"] = args.batch_size * args.grad_accum * dist_of(args).world
    if args.data:
        with open(args.data, "rb") as f:
            run["data_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return json.loads(json.dumps(run))  # as trainer_state.json holds it: tuples are lists


def read_state(path):  # the JSON object in path, or None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def sync(path):  # to disk, a file or a folder's entries: a checkpoint outlives a crash of the machine
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def save_checkpoint(out, step, model, opt, rng, run):
    """out/checkpoint/: the tensors after `step` steps in state-STEP.safetensors, then the
    trainer_state.json that names them, by rename; then the last one's tensors go."""
    weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_finite_weights(weights.items(), "checkpoint")  # every rank: FSDP's shards where they are
    folder, name, tensors = os.path.join(out, CHECKPOINT), f"state-{step}.safetensors", {}
    skeleton = pack({"weights": weights, "optimizer": opt.state_dict(), "rng": rng}, tensors)
    if rank0():
        os.makedirs(folder, exist_ok=True)
    write_gathered(os.path.join(folder, name), tensors)  # rank 0 writes what the ranks gather from FSDP
    if rank0():
        sync(os.path.join(folder, name))
        write_json(os.path.join(folder, STATE), {"step": step, "file": name, "run": run, "state": skeleton})
        sync(folder)
        for old in set(os.listdir(folder)) - {name, STATE}:  # the last one's, or what a kill left
            os.remove(os.path.join(folder, old))


def resume_root(args) -> str:
    """The output folder a run resumes from (--resume names it or its checkpoint/), else --output."""
    path = os.path.normpath(args.resume or args.output)
    return os.path.dirname(path) if os.path.basename(path) == CHECKPOINT else path


def check_resume(args):
    """Before the model loads. --resume of a finished run: say so, exit 0, retrain nothing;
    of a run made with other settings, or of nothing: a one-line error. A new run refuses
    an --output holding an unfinished run's checkpoint, the work it would lose."""
    root = resume_root(args)
    ckpt, done = os.path.join(root, CHECKPOINT), os.path.join(root, FINISHED)
    finished = read_state(done)
    saved = finished or read_state(os.path.join(ckpt, STATE))
    if not args.resume and saved and not finished:
        raise TuluError(f"{ckpt}: {args.output} holds an unfinished run (checkpoint of step {saved['step']}"
                        f"): continue it with --resume {args.output}, or choose another --output")
    if not args.resume:
        return
    if not saved:
        raise TuluError(f"{args.resume}: no checkpoint to resume from ({CHECKPOINT}/{STATE} missing)")
    changed = "; ".join(f"{k}: {saved['run'].get(k)} -> {v}" for k, v in run_record(args).items()
                        if saved["run"].get(k) != v)
    if changed:
        raise TuluError(f"{done}: that run finished, with other settings ({changed}); start a new run with "
                        f"another --output" if finished else
                        f"{ckpt}: the checkpoint was made with other settings ({changed})")
    if finished:
        if rank0():
            print(f"{root}: the run finished all {saved['step']} steps ({FINISHED}): nothing to resume")
        sys.exit(0)


def load_checkpoint(args, model, opt) -> int:
    """Restore what save_checkpoint wrote (check_resume compared its record); return its step."""
    from safetensors import safe_open
    ckpt = os.path.join(resume_root(args), CHECKPOINT)
    meta = read_state(os.path.join(ckpt, STATE))
    f = safe_open(os.path.join(ckpt, meta["file"]), framework="pt")  # each rank reads its rows (placed)
    state = unpack(meta["state"], {k: f.get_slice(k) for k in f.keys()})
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if state["weights"].keys() != trained.keys():  # another model at the path the record names
        raise TuluError(f"{ckpt}: its trainable weights do not match this model and --method")
    with torch.no_grad():
        for n, p in trained.items():
            p.copy_(placed(state["weights"][n], p))
    opt.load_state_dict(placed_state(state["optimizer"], opt))
    set_rng_state({"cpu": state["rng"]["cpu"][...], "cuda": [t[...] for t in state["rng"]["cuda"]]})
    print(f"resumed from {ckpt} after step {meta['step']}")
    return meta["step"]


def loss_svg(rows, title) -> str:
    """metrics.jsonl's loss against the step as an SVG line chart, no plotting library; a
    red line marks a non-finite step."""
    W, H, M = 640, 360, 50  # size, margin
    x0, x1 = rows[0]["step"], max(rows[-1]["step"], rows[0]["step"] + 1)
    top = max((r["loss"] for r in rows if r["loss"] is not None), default=1.0) * 1.05 or 1.0
    X = lambda s: M + (s - x0) / (x1 - x0) * (W - 2 * M)
    Y = lambda v: H - M - v / top * (H - 2 * M)
    text = lambda x, y, s, anchor="middle": f'<text x="{x:.0f}" y="{y:.0f}" text-anchor="{anchor}">{s}</text>'
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">',
           f'<rect width="{W}" height="{H}" fill="white"/>', text(W / 2, 20, html.escape(title)),
           f'<path d="M{M},{M} V{H - M} H{W - M}" fill="none" stroke="black"/>',
           text(M, M - 10, "loss"), text(W / 2, H - 10, "optimizer step")]
    for i in range(5):  # ticks
        v, s = top * i / 4, x0 + (x1 - x0) * i / 4
        out += [text(M - 6, Y(v) + 4, f"{v:.2f}", "end"), text(X(s), H - M + 16, f"{s:.0f}")]
    points = " ".join(f"{X(r['step']):.1f},{Y(r['loss']):.1f}" for r in rows if r["loss"] is not None)
    out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points}"/>')
    out += [f'<path d="M{X(r["step"]):.1f},{M} V{H - M}" stroke="red"/>' + text(X(r["step"]) - 4, M + 12,
            "non-finite", "end") for r in rows if "nonfinite" in r]  # json_safe marked it
    return "\n".join(out + ["</svg>\n"])


def write_text(path, text):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))


class Run:
    """What a training run does besides the recipe, called by the loop once per step:
    metrics.jsonl and loss.svg, a checkpoint every --save-every steps or --save-minutes
    and after Ctrl-C or SIGTERM (then exit 130), the stop at a non-finite step, --resume.
    While it runs (`with run:`), Ctrl-C and SIGTERM only set self.stop: a run never stops
    inside an optimiser step, and under torchrun the ranks decide together (any_rank). In
    one process a second Ctrl-C stops at once, without saving."""

    def __init__(self, args, out, total, per_epoch):
        self.args, self.out, self.total, self.per_epoch = args, out, total, per_epoch
        self.d, self.record, self.stop, self.old = dist_of(args), run_record(args), False, {}
        self.since, self.metrics = time.monotonic(), os.path.join(out, "metrics.jsonl")
        self.title = f"tulu {args.command} --method {args.method}: {os.path.basename(args.model or out)}"

    def resume(self, model, opt):
        """Restore the --resume checkpoint, and metrics.jsonl's rows up to its step (a kill may
        have left more, or one cut short); a new run removes what an earlier one left."""
        self.start = together(self.d, load_checkpoint, self.args, model, opt) if self.args.resume else 0
        self.rows = []
        if rank0() and self.start:
            with open(self.metrics) as f:
                self.rows = [json.loads(line) for line in f if line.endswith("\n")][:self.start]
        elif rank0():
            shutil.rmtree(os.path.join(self.out, CHECKPOINT), ignore_errors=True)
            pathlib.Path(self.out, FINISHED).unlink(missing_ok=True)
        if rank0():
            write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in self.rows))

    def steps(self):
        """The steps left, under a tqdm bar. Under torchrun each step first reseeds dropout
        from (seed, step, rank): ranks draw different masks, and a resumed run the same ones."""
        self.bar = tqdm(range(self.start, self.total), initial=self.start, total=self.total,
                        desc=self.args.command, dynamic_ncols=True)
        for step in self.bar:
            if self.d.world > 1:
                torch.manual_seed(hash((self.args.seed, step, self.d.rank)))
            self.t0, self.sums = time.time(), {}
            yield step
        self.bar.close()

    def add(self, loss, metrics, batch):
        """A micro-batch's share of the step's row: its loss, tokens and the task's sums."""
        for k, v in {**metrics, "loss": loss.item(), "tokens": int(batch["attention_mask"].sum())}.items():
            self.sums[k] = self.sums.get(k, 0) + v

    def finite(self, norm, denom) -> bool:
        """Whether the step may be applied: its loss and gradient norm (FSDP's: the whole
        gradient's), summed over the ranks, are finite, so every rank decides alike."""
        sums = dict(zip(self.sums, all_sum(self.d, *self.sums.values())))
        loss, norm = sums.pop("loss"), float(whole(norm))
        self.row = {"loss": loss, "grad_norm": norm, "tokens": int(sums.pop("tokens")),
                    **{k: v / denom for k, v in sums.items()}}  # the task's sums over pairs: means
        return math.isfinite(loss) and math.isfinite(norm)

    def plot(self):
        if rank0() and self.rows:
            write_text(os.path.join(self.out, "loss.svg"), loss_svg(self.rows, self.title))

    def kept(self) -> str:
        state = read_state(os.path.join(self.out, CHECKPOINT, STATE))
        return f"the checkpoint of step {state['step']} stays in {self.out}/{CHECKPOINT}" if state else ""

    def end_step(self, step, model, opt, lr):
        """After `step` steps: log the row; stop at a non-finite one (the loop did not apply it:
        nothing more is saved, the last checkpoint stays, the chart shows the step); then a
        checkpoint when due or asked to stop (not after the last step: the outputs come next)."""
        a, row = self.args, {"step": step, "epoch": round(step / self.per_epoch, 3), "lr": lr, **self.row}
        row["tokens_per_s"] = round(row["tokens"] / (time.time() - self.t0), 1)
        self.rows.append(json_safe(row))
        if rank0():
            with open(self.metrics, "a") as f:
                f.write(json.dumps(self.rows[-1]) + "\n")
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        names = {"loss": "loss", "grad_norm": "gradient norm"}
        if bad := [f"the {names[k]} is {row[k]}" for k in names if not math.isfinite(row[k])]:
            self.plot()
            raise TuluError(f"step {step}: {' and '.join(bad)}; stopped without applying this step, "
                            f"nothing saved{self.kept() and '; ' + self.kept()}; try a lower --lr (this run: "
                            f"{a.lr:g}) or --max-grad-norm (this run: {a.max_grad_norm:g}; 0: off)")
        if step == self.total:
            return
        minutes = a.save_minutes and time.monotonic() - self.since >= 60 * a.save_minutes
        stop, due = any_rank(self.d, self.stop, bool(a.save_every and step % a.save_every == 0 or minutes))
        if due or stop:
            together(self.d, save_checkpoint, self.out, step, model, opt, rng_state(), self.record)
            self.plot()
            self.since = time.monotonic()
            stop = stop or any_rank(self.d, self.stop)[0]  # a SIGTERM during the save: no step more
        if stop:
            self.bar.close()
            if rank0():
                print(f"\ninterrupted: {step} steps are saved in {self.out}/{CHECKPOINT}; continue with "
                      f"--resume {self.out}", file=sys.stderr)
            sys.exit(130)

    def finish(self, model, save=None) -> list[dict]:
        """After the last step: the chart, then save() writes the outputs (still under the
        signal handlers: a SIGTERM waits for whole outputs), then finished.json records the
        run, and the checkpoint goes (a kill between the two: finished.json wins)."""
        self.plot()
        model.eval()
        if save is not None:
            save()
            if rank0():
                write_json(os.path.join(self.out, FINISHED), {"step": self.total, "run": self.record})
                shutil.rmtree(os.path.join(self.out, CHECKPOINT), ignore_errors=True)
        return self.rows

    def on_signal(self, sig, frame):
        self.stop, again = True, ""
        if self.d.world == 1:  # under torchrun, the other ranks would wait for this one
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt
            again = " (Ctrl-C again: at once, without saving)"
        os.write(2, f"\n{signal.Signals(sig).name}: stopping after this step{again}\n".encode())

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, e, tb):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        if kind is KeyboardInterrupt:  # a second Ctrl-C, perhaps inside an optimiser step
            self.bar.close()
            print(f"\nstopped at once: {self.kept() or 'no checkpoint was written'}; continue with --resume "
                  f"{self.out}", file=sys.stderr)
            sys.exit(130)
