"""More than one GPU: torchrun, DDP for LoRA/QLoRA, FSDP2 for full fine-tuning and --fsdp.

`torchrun --nproc_per_node N tulu.py sft ...` starts N copies of the program, each told its
RANK, WORLD_SIZE and LOCAL_RANK (as nanoGPT's train.py reads them). A step's micro-batches
(batch-size x grad-accum x N examples) are dealt to the ranks (deal); each divides by the
learned tokens of the whole step, summed over the ranks (all_sum): the summed gradient and
the loss are one process's. lora/qlora: DDP over the adapters, each rank holding the frozen
base (data_parallel); with --fsdp, and for full, FSDP2 shards every weight (NF4 too, as
Answer.AI's FSDP+QLoRA), its gradient and AdamW state (shard). No rank holds the whole model:
each reads only its rows from the checkpoint (read_shards); saving gathers one tensor at a
time to rank 0 (write_gathered); --resume reads each rank's rows (placed), on any number of
ranks. Rank 0 alone prints and writes (rank0); an error on one rank ends every rank with
its one-line message (together), where the others would wait for it forever.
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
    """LOCAL_RANK modulo the visible GPUs, where a scheduler shows each task only its own."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank0() -> bool:
    return not distributed() or torch.distributed.get_rank() == 0


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return distributed() and isinstance(model, FSDPModule)


def setup_distributed(device: str) -> Dist:
    """Join torchrun's process group (NCCL on the GPU LOCAL_RANK names, or gloo on CPU); without
    torchrun, or inside a run (the demo SFT that rank 0 builds), a Dist of one."""
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
    if not rank0():  # ranks but 0 print nothing and draw no bars (errors still show)
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
    one node) ends every rank with its one-line error."""
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


def empty_model(path: str, dtype, device, quantize=None) -> llama.Llama:
    """load_model's model, no weight read: each is one zero expanded to its shape (no memory),
    on `device`, where add_lora puts the adapters; shard makes them meta tensors, then rows."""
    import nf4
    cfg = llama.LlamaConfig.from_json(os.path.join(path, "config.json"))
    if "quantization_config" in cfg.extra:
        raise TuluError(f"{path}: a bitsandbytes 4-bit folder does not shard (--fsdp): give its base model")
    empty = lambda shape, dt=dtype: torch.zeros((), dtype=dt, device=device).expand(shape)
    with torch.device("meta"):
        model = llama.Llama(cfg)
    for p in model.parameters():  # in place: tied weights stay tied
        torch.utils.swap_tensors(p, torch.nn.Parameter(empty(p.shape)))
    for name, m in list(model.named_modules()):
        if quantize and llama.decoder_linear(name + ".weight"):
            blocks, (parent, _, child) = m.weight.numel() // 64, name.rpartition(".")
            q = nf4.NF4Tensor(empty((blocks, 32), torch.uint8), empty((blocks,), torch.uint8), m.weight.shape,
                              dtype, 64, torch.zeros(-(-blocks // 256)), torch.zeros(()))
            setattr(model.get_submodule(parent), child, nf4.Linear4bit(q, None, dtype))
    return model.eval()


def rows(p) -> slice:
    """The rows of FSDP's sharded parameter p that this rank keeps: torch.chunk's pieces."""
    start = -(-p.shape[0] // p.device_mesh.size()) * p.device_mesh.get_local_rank()
    return slice(start, start + p.to_local().shape[0])


def read_nf4_rows(m, weight, d: Dist):
    """This rank's blocks of a 4-bit weight, quantized from their part of the weight (a slice).
    Double quantization takes the mean of every block's scale: gathered (1/64 of the weights),
    they are quantized once more whole, as one process's quantize_nf4 does, byte for byte."""
    import nf4
    r, n = rows(m.absmax), m.in_features
    w = weight[r.start * 64 // n:-(-r.stop * 64 // n)].reshape(-1)[r.start * 64 % n:][:(r.stop - r.start) * 64]
    w = w.to(m.absmax.device, m.weight_dtype)  # as load_nf4_linear quantizes it: in that dtype
    q = nf4.quantize_nf4_slices([w], w.shape, m.weight_dtype, double_quant=False, device=w.device)
    scales = [torch.zeros(-(-m.absmax.shape[0] // d.world), device=w.device) for _ in range(d.world)]
    torch.distributed.all_gather(scales, torch.cat([q.absmax, scales[0][len(q.absmax):]]))
    codes, m.nested_absmax, m.nested_offset = nf4.double_quantize(torch.cat(scales)[:m.absmax.shape[0]])
    m.packed.to_local().copy_(q.packed.view(-1, 32))
    m.absmax.to_local().copy_(codes[r])


@torch.no_grad()
def read_shards(model, path: str, d: Dist):
    """Each rank's rows of every weight, read from the checkpoint (get_slice), each tensor's file
    opened anew: the pages it maps leave our memory with it."""
    from safetensors import safe_open
    where = {k: f for f in llama.checkpoint_files(path) for k in safe_open(f, framework="pt").keys()}
    for name, p in model.named_parameters():
        key = name.replace(".base_layer", "").replace(".packed", ".weight")  # HF's: LoRA's base, NF4's codes
        if ".lora_" in key or key.endswith(".absmax"):
            continue
        if key not in where:
            raise TuluError(f"{path}: checkpoint lacks {key}")
        with safe_open(where[key], framework="pt") as f:
            weight, m, nf4 = f.get_slice(key), model.get_submodule(name.rpartition(".")[0]), name.endswith(".packed")
            llama.check_shape(key, weight.get_shape(), (m.out_features, m.in_features) if nf4 else p.shape)
            read_nf4_rows(m, weight, d) if nf4 else p.to_local().copy_(weight[rows(p)])


def shard(model, d: Dist, compute_dtype, path: str):
    """FSDP2 of an empty_model, then each rank reads its shards from `path`. A unit per decoder
    layer, then the root (embeddings, final norm, lm_head): a rank keeps 1/N of each weight,
    gradient and AdamW state, and gathers a unit's weights only while it computes with them.
    With bf16 compute the shards stay float32 (master weights) and are gathered in bf16;
    gradients are reduced in float32 (torchtune's policy). FSDP shards parameters (not buffers)
    in N pieces of their first dimension: so NF4's codes are a (blocks, 32) parameter, a row per
    block of 64 weights, and its scales' codes a (blocks,) one, rows of both covering the same
    blocks (uint8, which mixed precision never casts; Answer.AI's fsdp_qlora stored bf16)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from nf4 import Linear4bit
    for m in (m for m in model.modules() if isinstance(m, Linear4bit)):
        for part in ("packed", "absmax"):
            setattr(m, part, torch.nn.Parameter(m._buffers.pop(part), requires_grad=False))
    for p in (p for p in model.parameters() if 0 in p.stride()):  # empty_model's: meta, which fully_shard keeps
        torch.utils.swap_tensors(p, torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad))
    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # the root reshards after forward too (as torchtune's): after a no-grad forward (DPO's reference)
    # it would hold whole weights, which the optimiser built next would take
    fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    model._apply(lambda t: torch.empty_like(t, device=d.device) if t.is_meta else t)  # the rows to read
    read_shards(model, path, d)
    return model


def data_parallel(args, model):
    """The model the loop runs: under torchrun with lora/qlora, DDP, which all-reduces the adapters'
    gradients in a step's last backward (gradients are views of its buckets). The frozen base is
    never sent: rank 0's adapters are (DDP's init_sync and broadcast_buffers would send it too)."""
    d = dist_of(args)
    if d.world > 1:
        print(f"torchrun: {d.world} ranks, {'FSDP2' if is_sharded(model) else 'DDP'}; global batch = batch-size "
              f"x grad-accum x ranks = {args.batch_size} x {args.grad_accum} x {d.world} = "
              f"{args.batch_size * args.grad_accum * d.world} examples a step")
    if d.world == 1 or is_sharded(model):
        return model
    for p in model.parameters():
        if p.requires_grad:
            torch.distributed.broadcast(p.detach(), src=0)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.device] if d.device.type == "cuda" else None, init_sync=False,
        broadcast_buffers=False, gradient_as_bucket_view=True)


def grad_sync(model, last: bool):
    """DDP: one all-reduce, after a step's last micro-batch. FSDP reduce-scatters after every
    micro-batch: waiting would keep whole gradients on every rank, the memory sharding saves."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return model.no_sync() if ddp and not last else contextlib.nullcontext()


def deal(items: list, d: Dist) -> list:
    """This rank's share of a list: every N-th item, from its own, padded first with its
    first items where N does not divide it (DistributedSampler's padding)."""
    padded = items + (items * d.world)[:-len(items) % d.world]
    return padded[d.rank::d.world]


def undeal(results: list, n: int, d: Dist) -> list:
    """Every rank's results for its deal of n items, in the items' order (padding dropped)."""
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
    """Each flag True on every rank if it is on any: all stop, or save, alike."""
    return [v > 0 for v in all_sum(d, *map(float, flags))]


def whole(t):
    """A tensor that FSDP shards (a DTensor) gathered whole, on every rank; else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def write_gathered(fname: str, tensors: dict):
    """Rank 0 writes `tensors` to a safetensors file, each gathered whole just before it is
    written and freed after; the other ranks take part in each gather, in the same order."""
    if rank0():
        return llama.write_safetensors(fname, tensors, fetch=whole)
    for t in tensors.values():
        whole(t)


def placed(stored, like):
    """A checkpoint's tensor (a safetensors slice) read whole, or where FSDP shards `like` only
    the rows this rank keeps."""
    if not hasattr(like, "device_mesh"):
        return stored[...]
    out = torch.empty_like(like)
    out.to_local().copy_(stored[rows(like)])
    return out


def placed_state(state, opt):
    """An optimiser's state in a checkpoint, each rank reading its rows (placed)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {**state, "state": {i: {k: placed(v, params[int(i)] if v.get_shape() else None) for k, v in s.items()}
                               for i, s in state["state"].items()}}
