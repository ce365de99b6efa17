"""More than one GPU: torchrun, DDP for LoRA/QLoRA, FSDP2 for full fine-tuning and --fsdp.

`torchrun --nproc_per_node N tulu.py sft ...` starts N copies of the program, each told its
RANK, WORLD_SIZE and LOCAL_RANK (as nanoGPT's train.py reads them). A step's micro-batches,
batch-size x grad-accum x N examples, are dealt to the ranks in turn (deal); where N does not
divide them (an epoch's short last step), the first are dealt again, as DistributedSampler
pads, since FSDP's ranks must run as many. Every rank divides by the learned tokens (or pairs)
of the whole step, summed over the ranks (all_sum), so the summed gradient and the loss are
one process's over those micro-batches.

lora/qlora: DDP over the adapters, each rank holding the frozen base (data_parallel), or
with --fsdp FSDP2 as for full (Answer.AI's FSDP+QLoRA): it shards every weight, frozen (NF4
too: shardable_nf4) or trained, its gradient and AdamW state over the ranks (shard). Saving
writes a tensor at a time, each gathered to rank 0 as it is written (write_gathered);
resuming cuts a whole checkpoint to each rank's shards (placed).
Rank 0 alone prints and writes: rank0() is the one way code asks. An error on one rank
ends every rank with its one-line message (together), where the others would wait for
it forever. Without torchrun all of this reduces to a Dist of one rank and costs nothing.

Checkpoints hold whole tensors, so --resume works on another number of ranks as long as
the global batch (in the run's record) stays the same; dropout masks, drawn from (seed,
step, rank), repeat only on the same number. The price is host memory under FSDP: every
rank reads the whole model to its CPU before shard, and a checkpoint whole on --resume.
"""
import atexit
import contextlib
import datetime
import gc
import os
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

import llama
from llama import TuluError


@dataclass
class Dist:
    """This process among torchrun's; without torchrun, rank 0 of 1."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # NCCL: this rank's GPU (for collectives and DDP)
    waits: object = None  # the process group for long waits on one rank (setup_distributed)


SINGLE = Dist()


def dist_of(args) -> Dist:
    return getattr(args, "dist", None) or SINGLE  # eval's flags have none


def rank_device(local_rank: int) -> torch.device:
    """This rank's GPU: LOCAL_RANK modulo the visible GPUs, where a scheduler shows each task
    only its own (Slurm's per-task binding: one device, LOCAL_RANK 0..7)."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank0() -> bool:
    """Whether this process prints and writes: rank 0 of torchrun's, or the only one."""
    return not distributed() or torch.distributed.get_rank() == 0


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return distributed() and isinstance(model, FSDPModule)


def setup_distributed(device: str) -> Dist:
    """Join torchrun's process group: NCCL on the GPU LOCAL_RANK names, or gloo on CPU; without
    torchrun, or inside a run (the demo SFT that rank 0 builds), a Dist of one. Ranks but 0
    print nothing and draw no bars (errors still show)."""
    world, cuda = int(os.environ.get("WORLD_SIZE", 1)), device == "cuda"
    if world == 1 or torch.distributed.is_initialized():
        return Dist()
    dev = rank_device(int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)  # from here on, "cuda" is this rank's GPU
    torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    # waits for one rank (rank 0 encoding a large data file, writing a 70B checkpoint) get a gloo
    # group with a long timeout; NCCL's 10 minutes stay a step's limit, where a hung rank should fail
    waits = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=3))
    # a gloo group alive at Python's shutdown can abort it: destroy it at exit, once the error
    # that ended the run and the model are gone (FSDP's modules sit in reference cycles)
    atexit.register(lambda: (gc.collect(), torch.distributed.destroy_process_group()))
    if not rank0():
        sys.stdout = open(os.devnull, "w")
        init = tqdm.__init__
        tqdm.__init__ = lambda self, *a, **kw: init(self, *a, **{**kw, "disable": True})
    return Dist(int(os.environ["RANK"]), world, dev, waits)


class RankError(TuluError):
    """An error that every rank raises (see together); rank 0 alone prints it."""


def error_text(e) -> str:
    return f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)


def together(d: Dist, fn, *args):
    """fn(*args) on every rank. A TuluError or OSError on any rank (a data file missing on
    one node) ends every rank with its one-line error, where the others would wait for
    the failed rank in their next collective."""
    if d.world == 1:
        return fn(*args)
    try:
        out, err = fn(*args), None
    except (TuluError, OSError) as e:
        out, err = None, error_text(e)
    errors = [None] * d.world
    torch.distributed.all_gather_object(errors, err, group=d.waits)
    rank, err = next(((r, e) for r, e in enumerate(errors) if e), (0, None))
    if err:
        raise RankError(err if rank == 0 else f"{err} (rank {rank})")
    return out


def rank0_first(d: Dist, fn, *args):
    """fn(*args) on rank 0, then on the others, which find cached what it made: the demo model,
    the encoded data (a node that does not share rank 0's cache folder encodes it again)."""
    out = together(d, lambda: fn(*args) if rank0() else None)
    return together(d, lambda: out if rank0() else fn(*args))


def shardable_nf4(model):
    """FSDP2 shards parameters, not buffers, each in N equal pieces of its first dimension.
    So each Linear4bit's packed codes become a frozen (blocks, 32) parameter, a row per block of
    64 weights, and its scales' 8-bit codes a (blocks,) one: a rank's rows of the two cover the
    same blocks. Both are uint8, which FSDP's mixed precision never casts (Answer.AI's fsdp_qlora
    stored them as bf16 instead, its compute dtype). The scales' scales and offset, 1/16384 of
    the weight, stay buffers that every rank holds whole."""
    from nf4 import Linear4bit
    for m in (m for m in model.modules() if isinstance(m, Linear4bit)):
        if m.absmax.dtype != torch.uint8 or m.packed.numel() * 2 != m.absmax.numel() * m.blocksize:
            raise TuluError("--fsdp: a 4-bit weight needs double-quantized scales and whole blocks")
        for name, rows in (("packed", (-1, m.blocksize // 2)), ("absmax", (-1,))):
            setattr(m, name, torch.nn.Parameter(m._buffers.pop(name).view(rows), requires_grad=False))


def shard(model, d: Dist, compute_dtype=torch.float32):
    """FSDP2 (--method full, or --fsdp, under torchrun): one unit per decoder layer, then the
    root (embeddings, final norm, lm_head). A rank keeps 1/N of each weight, gradient and
    AdamW state, and gathers a unit's weights only while it computes with them. With
    bf16 compute the shards stay float32 (master weights) and are gathered in bf16,
    half the bytes sent; gradients are reduced in float32 (torchtune's policy). A frozen
    base (lora, qlora) is sharded as it is stored: bf16, or NF4 (shardable_nf4)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    shardable_nf4(model)
    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # the root reshards after forward too (as torchtune's): after a no-grad forward (DPO's reference)
    # it would hold whole weights, which the optimiser built next would take. It moves shards to the device
    return fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=mp)


def data_parallel(args, model):
    """The model the loop runs: under torchrun with lora/qlora, DDP, which averages the adapters'
    gradients over the ranks in a step's last backward, in its buckets (the gradients are views
    of them: no second copy). The frozen (NF4) base is never sent; rank 0's adapters are (DDP's
    init_sync would send the base too, and broadcast_buffers its NF4 buffers)."""
    d = dist_of(args)
    if d.world == 1:
        return model
    print(f"torchrun: {d.world} ranks, {'FSDP2' if is_sharded(model) else 'DDP'}; global batch = "
          f"batch-size x grad-accum x ranks = {args.batch_size} x {args.grad_accum} x {d.world} = "
          f"{args.batch_size * args.grad_accum * d.world} examples a step")
    if is_sharded(model):
        return model
    for p in model.parameters():
        if p.requires_grad:
            torch.distributed.broadcast(p.detach(), src=0)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.device] if d.device.type == "cuda" else None, init_sync=False,
        broadcast_buffers=False, gradient_as_bucket_view=True)


def grad_sync(model, last: bool):
    """DDP: gradients stay on each rank until a step's last micro-batch, then one
    all-reduce. FSDP reduce-scatters after every micro-batch: waiting would keep whole
    gradients on every rank, the memory that sharding saves."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return model.no_sync() if ddp and not last else contextlib.nullcontext()


def deal(items: list, d: Dist) -> list:
    """This rank's share of a list (a step's micro-batches, batches to score): every N-th
    item, from its own. A list that N does not divide is first padded with its first
    items (DistributedSampler's padding), so that every rank takes as many."""
    padded = items + (items * d.world)[:-len(items) % d.world]
    return padded[d.rank::d.world]


def undeal(results: list, n: int, d: Dist) -> list:
    """Every rank's results for its deal of n items, one per item, in the items' order
    (the padding's results dropped)."""
    if d.world == 1:
        return results
    shares = [None] * d.world
    torch.distributed.all_gather_object(shares, results)
    return [shares[k % d.world][k // d.world] for k in range(n)]


def all_sum(d: Dist, *values) -> list:
    """Each value summed over the ranks, in one all-reduce."""
    if d.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def any_rank(d: Dist, *flags) -> list[bool]:
    """Each flag True on every rank if it is on any (one all-reduce): all stop, or save, alike."""
    return [v > 0 for v in all_sum(d, *map(float, flags))]


def whole(t):
    """A tensor that FSDP shards (a DTensor) gathered whole, on every rank; else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def write_gathered(fname: str, tensors: dict):
    """Rank 0 writes `tensors` to a safetensors file, each gathered whole (FSDP's shards) just
    before it is written and freed after, so it never holds them all; the other ranks take
    part in each gather, in the same order."""
    if rank0():
        return llama.write_safetensors(fname, tensors, fetch=whole)
    for t in tensors.values():
        whole(t)


def placed(value, like):
    """A whole tensor cut to this rank's shard where `like` is sharded (FSDP); else value."""
    if not hasattr(like, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor  # each rank cuts its own shard: no messages
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def placed_state(state, opt):
    """A whole optimiser state (one process's) cut to this rank's shards."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {**state, "state": {i: {k: placed(v, params[int(i)]) if v.dim() else v for k, v in s.items()}
                               for i, s in state["state"].items()}}
