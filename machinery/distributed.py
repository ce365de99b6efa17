"""More than one GPU: torchrun, DDP for LoRA/QLoRA, FSDP2 for full fine-tuning and --fsdp.

`torchrun --nproc_per_node N tulu.py sft ...` starts N copies of the program, each told its
RANK, WORLD_SIZE and LOCAL_RANK (as nanoGPT's train.py reads them). A step's micro-batches are
dealt to the ranks (deal); each divides by the learned tokens of the whole step (all_sum): the
summed gradient and the loss are one process's. lora/qlora: DDP over the adapters, each rank
holding the frozen base; with --fsdp, and for full, FSDP2 shards every weight (NF4 too, as
Answer.AI's FSDP+QLoRA), its gradient and AdamW state, and no rank ever holds the whole model:
it reads only its rows of the checkpoint, and rank 0 saves a gathered tensor at a time.
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
import nf4
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


def uses_fsdp(method: str, fsdp: bool, world: int) -> bool:
    """Whether a run shards with FSDP2: --method full on several ranks always, lora/qlora with --fsdp."""
    return world > 1 and (method == "full" or fsdp)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return distributed() and isinstance(model, FSDPModule)


def setup_distributed(device: str) -> Dist:
    """torchrun's process group, NCCL or gloo; without torchrun, or inside a run, a Dist of one."""
    world, cuda = int(os.environ.get("WORLD_SIZE", 1)), device == "cuda"
    if world == 1 or torch.distributed.is_initialized():
        return Dist()
    dev = rank_device(int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)  # from here on, "cuda" is this rank's GPU
    torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    # waits for one rank (encoding the data, writing a 70B checkpoint): gloo, a long timeout; NCCL's
    # 10 minutes stay a step's limit, where a hung rank should fail
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
    """fn(*args) on every rank. A TuluError or OSError on any rank ends every rank with its line."""
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
    """fn(*args) on rank 0, then on the others, which find cached what it made (the encoded data)."""
    out = together(d, lambda: fn(*args) if rank0() else None)
    return together(d, lambda: out if rank0() else fn(*args))


def empty_model(path: str, dtype, device, quantize=None) -> llama.Llama:
    """load_model's model, no weight read: each is one zero expanded to its shape (no memory) on
    `device`, where add_lora puts the adapters; shard makes them meta tensors, then its rows."""
    cfg = llama.LlamaConfig.from_json(os.path.join(path, "config.json"))  # 4-bit: refused (plan.settings)
    empty = lambda shape, dt=dtype: torch.zeros((), dtype=dt, device=device).expand(shape)
    with torch.device("meta"):
        model = llama.Llama(cfg)
    for p in model.parameters():  # in place: tied weights stay tied
        torch.utils.swap_tensors(p, torch.nn.Parameter(empty(p.shape)))
    for name, m in list(model.named_modules()):
        if quantize and llama.decoder_linear(name + ".weight"):
            (blocks, rest), (parent, _, child) = divmod(m.weight.numel(), 64), name.rpartition(".")
            if rest:  # a rank's rows of codes must be whole blocks
                raise TuluError(f"--fsdp: {name} is not made of whole 64-weight blocks")
            q = nf4.NF4Tensor(empty((blocks, 32), torch.uint8), empty((blocks,), torch.uint8), m.weight.shape,
                              dtype, 64, torch.zeros(-(-blocks // nf4.DQ_BLOCKSIZE)), torch.zeros(()))
            setattr(model.get_submodule(parent), child, nf4.Linear4bit(q, None, dtype))
    return model.eval()


def rows(p) -> slice:
    """The rows of FSDP's sharded parameter p that this rank keeps: torch.chunk's pieces."""
    start = -(-p.shape[0] // p.device_mesh.size()) * p.device_mesh.get_local_rank()
    return slice(start, start + p.to_local().shape[0])


def read_nf4_rows(m, weight, d: Dist):
    """This rank's blocks of a 4-bit weight, quantized from their part of the weight (a slice). The
    block scales, gathered (1/64 of the weights), are double-quantized whole, as by quantize_nf4."""
    r, n, b = rows(m.absmax), m.in_features, m.blocksize  # blocks start..stop: weights b start..b stop
    w = weight[r.start * b // n:-(-r.stop * b // n)].reshape(-1)  # the rows that hold them
    w = w[r.start * b % n:][:(r.stop - r.start) * b]
    w = w.to(m.absmax.device, m.weight_dtype)  # as load_model's read_nf4 quantizes it: in that dtype
    q = nf4.quantize_nf4_slices([w], w.shape, m.weight_dtype, double_quant=False, device=w.device)
    piece = -(-m.absmax.shape[0] // d.world)  # the last rank's may be shorter
    scales = [torch.empty(piece, device=w.device) for _ in range(d.world)]
    torch.distributed.all_gather(scales, torch.nn.functional.pad(q.absmax, (0, piece - len(q.absmax))))
    codes, m.nested_absmax, m.nested_offset = nf4.double_quantize(torch.cat(scales)[:m.absmax.shape[0]])
    m.packed.to_local().copy_(q.packed.view(-1, 32))
    m.absmax.to_local().copy_(codes[r])


@torch.no_grad()
def read_shards(model, path: str, d: Dist):
    """Each rank's rows of every weight (get_slice), each file opened anew: its mapped pages go."""
    from safetensors import safe_open
    where = {k: f for f in llama.checkpoint_files(path) for k in safe_open(f, framework="pt").keys()}
    for name, p in model.named_parameters():
        key = name.replace(".base_layer", "").replace(".packed", ".weight")  # HF's: LoRA's base, NF4's codes
        if ".lora_" in key or key.endswith(".absmax"):
            continue
        if key not in where:
            raise TuluError(f"{path}: checkpoint lacks {key}")
        m = model.get_submodule(name.rpartition(".")[0])
        with safe_open(where[key], framework="pt") as f:
            if isinstance(m, nf4.Linear4bit):
                llama.check_shape(key, f.get_slice(key).get_shape(), (m.out_features, m.in_features))
                read_nf4_rows(m, f.get_slice(key), d)
            else:
                llama.check_shape(key, f.get_slice(key).get_shape(), p.shape)
                p.to_local().copy_(f.get_slice(key)[rows(p)])


def shard(model, d: Dist, compute_dtype, path: str):
    """FSDP2 of an empty_model, a unit per decoder layer, then the root; then each rank reads its
    rows from `path`. bf16 compute: float32 shards (master weights) gathered in bf16, gradients
    reduced in float32 (torchtune's). FSDP shards parameters in N pieces of their first dimension:
    NF4's codes become a (blocks, 32) parameter, a row per block of 64 weights, its scales' codes a
    (blocks,) one (uint8, which mixed precision never casts; Answer.AI's fsdp_qlora stored bf16)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    for m in (m for m in model.modules() if isinstance(m, nf4.Linear4bit)):
        for part in ("packed", "absmax"):
            setattr(m, part, torch.nn.Parameter(m._buffers.pop(part), requires_grad=False))
    for p in (p for p in model.parameters() if 0 in p.stride()):  # empty_model's, made meta: fully_shard
        torch.utils.swap_tensors(p, torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad))
    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    units = [*model.model.layers] + [model.model.embed_tokens] * (not model.config.tie_word_embeddings)
    for unit in units:  # an untied embedding apart (torchtitan's): gathered for its lookup alone
        fully_shard(unit, mesh=mesh, mp_policy=mp)
        if d.device.type == "cpu":  # gloo gathers in line, overlapping nothing: prefetching the next
            unit.set_modules_to_backward_prefetch([unit])  # layer in backward would only hold it longer
    # the root reshards after forward too (torchtune's), or after DPO's reference it would hold whole weights
    fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    model._apply(lambda t: torch.empty_like(t, device=d.device) if t.is_meta else t)  # then their rows
    read_shards(model, path, d)
    return model


def data_parallel(args, model):
    """Under torchrun with lora/qlora, DDP of the adapters: rank 0's are sent, never the frozen base
    (as DDP's init_sync and broadcast_buffers would); gradients are views of its buckets."""
    d = dist_of(args)
    if d.world > 1:
        print(f"torchrun: {d.world} ranks, {'FSDP2' if is_sharded(model) else 'DDP'}; global batch = "
              f"batch-size x grad-accum x ranks = {args.batch_size} x {args.grad_accum} x {d.world} = "
              f"{args.batch_size * args.grad_accum * d.world} examples a step")
    if d.world == 1 or is_sharded(model):
        return model
    for p in (p for p in model.parameters() if p.requires_grad):
        torch.distributed.broadcast(p.detach(), src=0)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.device] if d.device.type == "cuda" else None, init_sync=False,
        broadcast_buffers=False, gradient_as_bucket_view=True)


def grad_sync(model, last: bool):
    """DDP all-reduces after a step's last micro-batch; FSDP reduce-scatters after each (or whole
    gradients would wait on every rank)."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return model.no_sync() if ddp and not last else contextlib.nullcontext()


def deal(items: list, d: Dist) -> list:
    """Every N-th item from this rank's, the list padded with its first (as DistributedSampler)."""
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
    """Rank 0 writes `tensors`, each gathered whole just before it is written; the others help."""
    if rank0():
        return llama.write_safetensors(fname, tensors, fetch=whole)
    for t in tensors.values():
        whole(t)


def placed(stored, like):
    """A checkpoint's tensor (a safetensors slice), whole or the rows this rank keeps of `like`."""
    if not hasattr(like, "device_mesh"):
        return stored[...]
    out = torch.empty_like(like)
    out.to_local().copy_(stored[rows(like)])
    return out


def placed_state(state, opt):
    """An optimiser's state in a checkpoint, each rank reading its rows (placed)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {**state, "state": {i: {k: placed(v, params[int(i)] if v.get_shape() else None)
                                   for k, v in s.items()} for i, s in state["state"].items()}}
