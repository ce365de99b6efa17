"""What tests/test_distributed.py starts under torchrun, and tests/test_resume.py as one
process: tulu's command line, with a fault that the test asks for through the
environment, on the rank TULU_TEST_RANK only (without torchrun: the one process):

    TULU_TEST_SIGTERM_AT=N    the rank sends itself SIGTERM during its N-th micro-batch,
                              as a scheduler's signal may reach one rank before the others
    TULU_TEST_SIGKILL_AT=N    the same with SIGKILL: the process ends there, as when the
                              machine is lost or a scheduler's grace period runs out
    TULU_TEST_NO_DATA=1       the rank's --data names a file that does not exist, as on a
                              node that lacks it
    TULU_TEST_LOSS_INF_AT=N   the rank's N-th micro-batch loss is +inf (its gradient stays
                              finite: inf is added, not multiplied)
    TULU_TEST_NAN_WEIGHT=1    after each optimiser step, lm_head.weight[0, 0] is NaN where the
                              rank holds it (under FSDP: its shard alone)

and, on every rank, TULU_TEST_ENCODES=FILE appends the rank to FILE each time it encodes
a data file (rather than reading the encoded-data cache), TULU_TEST_STEPS=FILE each
time its optimiser applies a step, and TULU_TEST_SHARDS=DIR the model's parameters and
buffers that the rank holds (of FSDP's, its shards) once it is built, in DIR/rank{RANK}.safetensors,
and TULU_TEST_GATHERED=FILE logs (in FILE{RANK}) G for each of FSDP's all-gathers, L when a backward begins and B
in each decoder layer's backward.
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tulu  # noqa: E402
from machinery import data  # noqa: E402

if os.environ.get("RANK", "0") == os.environ.get("TULU_TEST_RANK", "0"):
    for var, sig in (("TULU_TEST_SIGTERM_AT", signal.SIGTERM), ("TULU_TEST_SIGKILL_AT", signal.SIGKILL)):
        if os.environ.get(var):
            calls, at = [], int(os.environ[var])
            for task in (tulu.SFTTask, tulu.DPOTask):
                def loss(self, *a, _loss=task.loss, _sig=sig, **kw):
                    calls.append(1)
                    if len(calls) == at:
                        os.kill(os.getpid(), _sig)
                    return _loss(self, *a, **kw)
                task.loss = loss
    if os.environ.get("TULU_TEST_LOSS_INF_AT"):
        calls, at = [], int(os.environ["TULU_TEST_LOSS_INF_AT"])

        def inf_loss(self, *a, _loss=tulu.SFTTask.loss, **kw):
            calls.append(1)
            loss, metrics = _loss(self, *a, **kw)
            return (loss + float("inf"), metrics) if len(calls) == at else (loss, metrics)
        tulu.SFTTask.loss = inf_loss
    if os.environ.get("TULU_TEST_NAN_WEIGHT"):
        def nan_build(*a, _build=tulu.build_optimizer, **kw):
            opt = _build(*a, **kw)

            def step(*x, _step=opt.step, **k):
                out = _step(*x, **k)
                weight = opt.param_groups[0]["params"][-1]  # lm_head's
                (weight.to_local() if hasattr(weight, "to_local") else weight).data[0, 0] = float("nan")
                return out
            opt.step = step
            return opt
        tulu.build_optimizer = nan_build
    if os.environ.get("TULU_TEST_NO_DATA"):
        argv = sys.argv[1:]
        argv[argv.index("--data") + 1] += ".missing"
        sys.argv[1:] = argv

if os.environ.get("TULU_TEST_ENCODES"):
    def encode_file(*a, _encode=data.encode_file, **kw):
        with open(os.environ["TULU_TEST_ENCODES"], "a") as f:
            f.write(os.environ.get("RANK", "0") + "\n")
        return _encode(*a, **kw)
    data.encode_file = encode_file

if os.environ.get("TULU_TEST_STEPS"):
    def build_optimizer(*a, _build=tulu.build_optimizer, **kw):
        opt = _build(*a, **kw)

        def step(*x, _step=opt.step, **k):
            with open(os.environ["TULU_TEST_STEPS"], "a") as f:
                f.write(os.environ.get("RANK", "0") + "\n")
            return _step(*x, **k)
        opt.step = step
        return opt
    tulu.build_optimizer = build_optimizer

if os.environ.get("TULU_TEST_SHARDS"):
    def build_policy(*a, _build=tulu.build_policy, **kw):
        from safetensors.torch import save_file
        model = _build(*a, **kw)
        local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().contiguous()
        held = {n: local(t) for n, t in [*model.named_parameters(), *model.named_buffers()]}
        rank = os.environ.get("RANK", "0")
        save_file(held, os.path.join(os.environ["TULU_TEST_SHARDS"], f"rank{rank}.safetensors"))
        return model
    tulu.build_policy = build_policy

if os.environ.get("TULU_TEST_GATHERED"):
    import torch.distributed

    def log(event: str):
        with open(os.environ["TULU_TEST_GATHERED"] + os.environ.get("RANK", "0"), "a") as f:
            f.write(event + "\n")

    def all_gather_single(*a, _gather=torch.distributed.all_gather_single, **kw):  # FSDP2's gathers
        log("G")
        return _gather(*a, **kw)
    torch.distributed.all_gather_single = all_gather_single

    def sft_loss(self, *a, _loss=tulu.SFTTask.loss, **kw):
        loss, metrics = _loss(self, *a, **kw)
        loss.register_hook(lambda g: log("L"))  # backward begins
        return loss, metrics
    tulu.SFTTask.loss = sft_loss

    def build_policy(*a, _build=tulu.build_policy, **kw):
        model = _build(*a, **kw)
        for layer in model.model.layers:  # inside each layer's backward
            layer.mlp.register_full_backward_hook(lambda *_: log("B"))
        return model
    tulu.build_policy = build_policy

if __name__ == "__main__":  # not in a data worker, which imports this file afresh
    tulu.main(sys.argv[1:])
