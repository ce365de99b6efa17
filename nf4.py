"""Chapter 2: 4-bit NormalFloat weights and paged optimizer state.

What this file teaches: the three ideas of QLoRA (Dettmers et al. 2023, arXiv
2305.14314) that let a 70B model be fine-tuned on one GPU, byte for byte as
bitsandbytes stores them:
1. 4-bit NormalFloat (NF4): trained weights are close to normal, so the 16 code
   values are quantiles of N(0, 1); each block of 64 weights is scaled by its
   absolute maximum into [-1, 1] and each weight kept as the 4-bit index of its
   nearest code value.
2. Double quantization: a float32 scale per block costs 32/64 = 0.5 bit a
   weight; quantizing the scales to 8 bits in blocks of 256 brings the total to
   4 + 8/64 + 32/(64*256) = 4.127 bits a weight.
3. Paged optimizers: AdamW's state lives in CPU pages; a step brings what it
   needs to the accelerator, never more than a fixed budget of it at once.
`Linear4bit` keeps a frozen 4-bit weight and rebuilds it in bf16 inside forward
and again in backward: gradients reach the input (and chapter 3's LoRA
adapters), never the weight. The last section quantizes each decoder weight as
llama.load_model reads it, a slice at a time: no full-precision weight is ever whole.

Shapes: N weights, Bk = N/64 blocks, D in and O out features. Read top to bottom.
"""
from __future__ import annotations

import ctypes
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama import TuluError, check_shape

# -----------------------------------------------------------------------------
# Code books: NF4 for the weights, the 8-bit dynamic map for their scales


def nf4_code_book(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 values, sorted, float32 (QLoRA section 3, "4-bit NormalFloat").

        q = Phi^-1(p) for evenly spaced probabilities p, then q / max(q)

    Phi^-1 is the inverse CDF of N(0, 1): each code value is a quantile, so a
    normal weight is equally likely to fall near any of them. Three details:
    - exact zero: zero weights and padding must survive, so 0 is a code value;
    - asymmetric halves: 8 positive quantiles (9 points from `offset` down to
      0.5, 0.5 dropped) and 7 negative ones (8 points): 8 + 7 + zero = 16;
    - Phi^-1(1) is infinite, so the outermost point is offset = 0.9677083, the
      mean of 1 - 1/30 and 1 - 1/32 (the centre of the last of 15 or of 16
      equal-probability bins).
    Points are spaced in float32 and quantiles rounded to float32 before the
    division, as bitsandbytes built the table it ships.
    """
    # exercise: nf4_code_book
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()
    code = torch.cat([neg, torch.zeros(1), pos]).sort().values
    return code / code.max()
    # end exercise


def linspace_fma(start: float, end: float, n: int) -> torch.Tensor:
    """torch.linspace(start, end, n) in float32 as its vectorized CPU kernel (AVX2 and
    up, where bitsandbytes built its dynamic map) computes it: step = (end - start) /
    (n - 1); the first half start + step*i, the rest end - step*(n-1-i), each one fused
    multiply-add. Exact in float64, rounded once: the same bits on every machine (the
    scalar kernel of other CPUs rounds twice)."""
    s, e = torch.tensor(start, dtype=torch.float32), torch.tensor(end, dtype=torch.float32)
    step = ((e - s) / (n - 1)).double()
    i = torch.arange(n, dtype=torch.float64)
    return torch.where(i < n // 2, s.double() + step * i, e.double() - step * (n - 1 - i)).float()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2015, arXiv 1511.04561),
    used for the double-quantized scales: 256 sorted float32 values in [-1, 1].

    For e = 0..6, 2^e magnitudes 10^(e-6) * m, m the midpoints of 2^e equal steps
    from 0.1 to 1, each with both signs; then 0 and 1: 2*(1+2+..+64) + 2 = 256.
    Each decade has its own exponent, so small values keep relative precision.
    Built in float32 in bitsandbytes' order of operations: its bits decide codes.
    """
    vals = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        edges = linspace_fma(0.1, 1.0, 2**e + 1)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)
        vals += [mids, -mids]
    return torch.cat(vals).sort().values


class Unfinished:
    """Stands for a constant whose exercise is not done yet (the student copy of
    `tulu.py exercises`): the module imports, and any use raises the exercise's error."""

    def __init__(self, error):
        self.error = error

    def __getattr__(self, name):
        raise self.error

    __getitem__ = __getattr__


try:
    NF4 = nf4_code_book()  # (16,); NF4[7] == 0
except NotImplementedError as e:
    NF4 = Unfinished(e)
DYNAMIC = dynamic_map()  # (256,)
ZERO_CODE = 7            # index of 0.0 in NF4: pads an odd count
DQ_BLOCKSIZE = 256       # blocks of scales in double quantization
SLICE = 2**16            # weights quantized at a time: 0.25 MB float32 temporaries

# -----------------------------------------------------------------------------
# Blockwise absmax quantization


def nearest_code(x: torch.Tensor, code: torch.Tensor, even_ties: bool = False) -> torch.Tensor:
    """Index (uint8) of the nearest value of the sorted `code` for each x, by comparing
    x with the float32 midpoints. A tie goes to the lower code, as in bitsandbytes'
    NF4 kernels; with even_ties to the even index, as in its CUDA kernel for 8-bit
    codes, whose binary search from 127 in steps 64, 32, .., 1 ends on an even index."""
    code = code.to(x.device)
    mids = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(x, mids, out_int32=True)  # mids[idx - 1] < x <= mids[idx]
    if even_ties:
        idx += (idx % 2 == 1) & (x == mids[idx.clamp(max=len(mids) - 1)])
    return idx.to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int, even_ties: bool = False):
    """Absmax quantization per block (QLoRA Eq. 1 with one constant per block):

        absmax_b = max |x_i| over block b;   c_i = nearest_code(x_i * (1 / absmax_b))

    x: (N,) float32 -> codes (N,) uint8, absmax (ceil(N/blocksize),) float32.
    A last, shorter block takes its own absmax. x is multiplied by the float32
    reciprocal as bitsandbytes' CUDA kernel does, not divided: the two can differ
    in the last bit, and that can move a value across a midpoint (its CPU path
    divides in a shorter last block). An all-zero block is scaled by 1/1e-38, so it
    keeps the code of 0.0 as on the CPU path (CUDA's 0 * inf = NaN takes index 0).
    """
    # exercise: quantize_blockwise
    n = x.numel()
    blocks = F.pad(x, (0, -n % blocksize)).view(-1, blocksize)  # zero padding never raises an absmax
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1 / absmax.clamp(min=1e-38))[:, None]
    return nearest_code(scaled.view(-1)[:n], code, even_ties), absmax
    # end exercise


CODES: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}  # code_on's copies


def code_on(code: torch.Tensor, device) -> torch.Tensor:
    """A code book (NF4, DYNAMIC: tables never written to) on `device`, copied there
    once and kept. Every 4-bit layer looks its scales up in DYNAMIC in forward, in
    backward and again when a checkpointed layer recomputes: a fresh copy each time
    would be a blocking host-to-device transfer in each. Keyed by the table's id;
    the entry holds the table itself, so that id can never pass to another tensor."""
    device = torch.device(device)
    if code.device == device:
        return code
    key = (id(code), device)
    if key not in CODES:
        CODES[key] = (code, code.to(device))
    return CODES[key][1]


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """x_i ~= code[c_i] * absmax_b for x_i in block b, the inverse of quantize_blockwise
    (QLoRA Eq. 2 with one constant per block). codes (N,) uint8, absmax
    (ceil(N/blocksize),) float32 -> (N,) float32."""
    code = code_on(code, codes.device)
    # exercise: dequantize_blockwise
    n = codes.numel()
    vals = F.pad(code[codes.int()], (0, -n % blocksize)).view(-1, blocksize)
    return (vals * absmax[:, None]).view(-1)[:n]
    # end exercise


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte, the earlier one in the high nibble, as bitsandbytes
    packs them; an odd count is padded with ZERO_CODE. (N,) -> (ceil(N/2),) uint8."""
    codes = F.pad(codes, (0, codes.numel() % 2), value=ZERO_CODE)
    return codes[0::2] << 4 | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n]


# -----------------------------------------------------------------------------
# NF4 with double quantization


@dataclass
class NF4Tensor:
    """A weight in NF4; field names as bitsandbytes and transformers serialize them."""
    packed: torch.Tensor       # (ceil(N/2),) uint8, two codes a byte
    absmax: torch.Tensor       # (Bk,) float32 block scales; their uint8 codes when double-quantized
    shape: torch.Size
    dtype: torch.dtype         # of the original weight, and of dequantize_nf4's result
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None  # (ceil(Bk/256),) float32: the scales' own scales
    nested_offset: torch.Tensor | None = None  # () float32: mean of the block scales


def double_quantize(absmax: torch.Tensor):
    """The block scales quantized once more, to 8 bits in blocks of 256 (QLoRA
    section 3, "Double Quantization"):

        offset = mean(absmax);  c2, nested_absmax = quantize_blockwise(absmax - offset, DYNAMIC, 256)

    Scales are all positive: taking their mean out uses both signs of the 8-bit code.
    Nearest codes are exact with ties to even (even_ties=True), as bitsandbytes' CUDA
    kernel rounds; its 0.50 CPU kernel reads an approximate lookup table and misses on
    ~0.1% of them. absmax (Bk,) float32 -> c2 (Bk,) uint8, nested_absmax
    (ceil(Bk/256),) float32, offset () float32."""
    # exercise: double_quant
    offset = absmax.mean()
    codes, nested_absmax = quantize_blockwise(absmax - offset, DYNAMIC, DQ_BLOCKSIZE, even_ties=True)
    return codes, nested_absmax, offset
    # end exercise


def slice_size(blocksize: int = 64) -> int:
    """SLICE rounded to an even number of whole blocks: cut there, a weight's
    slices split no block (each keeps its own absmax) and no byte (two codes)."""
    return 2 * blocksize * max(1, SLICE // (2 * blocksize))


def quantize_nf4_slices(slices, shape, dtype, blocksize: int = 64, double_quant: bool = True,
                        device="cpu") -> NF4Tensor:
    """quantize_nf4 of a weight of `shape` given as its flat values in order, in
    slices of slice_size(blocksize) (the last may be shorter), bit for bit.

    Each slice is quantized and its packed codes and block scales written into
    place at once, so the float32 temporaries are one slice's and nothing of the
    weight outlives its slice: with slices read one at a time from a file
    (llama.load_model), a full-precision weight is never in memory at all."""
    n = math.prod(shape)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    code, done = NF4.to(device), 0
    for s in slices:
        if done % (2 * blocksize):  # a short slice before this one: its last block or byte was cut
            raise ValueError(f"quantize_nf4_slices: a slice follows {done} weights, not a multiple of "
                             f"{2 * blocksize}; only the last slice may be shorter")
        codes, scales = quantize_blockwise(s.float().reshape(-1), code, blocksize)
        two_codes = pack_nibbles(codes)
        packed[done // 2:done // 2 + len(two_codes)] = two_codes
        absmax[done // blocksize:done // blocksize + len(scales)] = scales
        done += s.numel()
    if done != n:
        raise ValueError(f"quantize_nf4_slices: slices of {done} weights for a shape of {n}")
    q = NF4Tensor(packed, absmax, torch.Size(shape), dtype, blocksize)
    if double_quant:
        q.absmax, q.nested_absmax, q.nested_offset = double_quantize(absmax)
    return q


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """QLoRA's storage of a weight (section 3): NF4 codes in blocks of
    `blocksize`, and with double_quant the block scales quantized once more
    (double_quantize). The same bytes as bitsandbytes' quantize_4bit(w, blocksize,
    compress_statistics=double_quant, quant_type="nf4"), from the weight in its
    own dtype (a bf16 weight is quantized from its bf16 values)."""
    slices = w.detach().reshape(-1).split(slice_size(blocksize))
    return quantize_nf4_slices(slices, w.shape, w.dtype, blocksize, double_quant, w.device)


def block_scales(q: NF4Tensor) -> torch.Tensor:
    """absmax of each block, float32; rebuilt from its 8-bit codes when double-quantized."""
    if q.nested_absmax is None:
        return q.absmax
    return dequantize_blockwise(q.absmax, q.nested_absmax, DYNAMIC, DQ_BLOCKSIZE) + q.nested_offset


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """w ~= NF4[c] * absmax_b in float32, cast to q.dtype. Double-quantized scales
    are rebuilt first, absmax = DYNAMIC[c2] * nested_absmax + offset (QLoRA Eq. 6)."""
    w = dequantize_blockwise(unpack_nibbles(q.packed, math.prod(q.shape)), block_scales(q), NF4, q.blocksize)
    return w.view(q.shape).to(q.dtype)


def bits_per_param(q: NF4Tensor) -> float:
    """Storage cost: 4 + 32/64 = 4.5 bits, or with double quantization
    4 + 8/64 + 32/(64*256) = 4.127 bits (QLoRA section 3), plus the offset."""
    stored = [q.packed, q.absmax, q.nested_absmax, q.nested_offset]
    return sum(8 * t.numel() * t.element_size() for t in stored if t is not None) / math.prod(q.shape)


# -----------------------------------------------------------------------------
# Linear4bit: a frozen NF4 weight inside the model


PAIRS: dict[torch.device, torch.Tensor] = {}  # nf4_pairs' tables by device (a dict: torch.compile reads it)


def nf4_pairs(device) -> torch.Tensor:
    """(256,) int64: for each byte value, the two float32 NF4 values it holds (high
    nibble first) side by side in one 8-byte word. Looking up one word per byte
    is several times faster than a (256, 2) table's rows of two floats."""
    device = torch.device(device)
    if device not in PAIRS:
        pairs = torch.stack([NF4.repeat_interleave(16), NF4.repeat(16)], dim=1)  # (256, 2) float32
        PAIRS[device] = pairs.contiguous().view(torch.int64).view(256).to(device)
    return PAIRS[device]


def dequantize_nf4_fast(q: NF4Tensor) -> torch.Tensor:
    """dequantize_nf4(q), bit for bit, in a quarter of the time: one table lookup
    per byte (nf4_pairs) instead of splitting nibbles and looking up each, and
    the block scales applied in place. The fast path of every training step;
    dequantize_nf4 stays the reference."""
    if q.blocksize % 2 or math.prod(q.shape) % q.blocksize:  # a ragged last block: the plain way
        return dequantize_nf4(q)
    words = nf4_pairs(q.packed.device).index_select(0, q.packed.int())  # (N/2,) int64
    vals = words.view(torch.float32).view(-1, q.blocksize)  # (N/B, B): NF4 values in order
    return vals.mul_(block_scales(q)[:, None]).view(q.shape).to(q.dtype)


class NF4Matmul(torch.autograd.Function):
    """y = x W^T and dx = dy W for W = dequantize_nf4(q) in `dtype` (QLoRA Eq. 5
    without its LoRA term). W is frozen, so it gets no gradient, and is rebuilt in
    backward rather than saved: between the two only the 4-bit weight is kept."""

    @staticmethod
    def forward(ctx, x, q, dtype):
        ctx.q, ctx.dtype = q, dtype
        return F.linear(x, dequantize_nf4_fast(q).to(dtype))

    @staticmethod
    def backward(ctx, dy):
        return dy @ dequantize_nf4_fast(ctx.q).to(ctx.dtype), None, None


class Linear4bit(nn.Module):
    """A frozen nn.Linear whose weight is held in NF4 as buffers (packed, absmax,
    nested_absmax, nested_offset), so `.to(device)` moves it. forward casts x to
    compute_dtype, returns x W^T + b cast back to x's dtype (as bitsandbytes)."""

    def __init__(self, q: NF4Tensor, bias=None, compute_dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.compute_dtype, self.weight_dtype, self.blocksize = compute_dtype, q.dtype, q.blocksize
        for name in ("packed", "absmax", "nested_absmax", "nested_offset"):
            self.register_buffer(name, getattr(q, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype=torch.bfloat16) -> "Linear4bit":
        return cls(quantize_nf4(linear.weight.detach()), linear.bias, compute_dtype)

    def quant_state(self) -> NF4Tensor:
        # packed is (blocks, 32) under FSDP (machinery.distributed.shardable_nf4)
        return NF4Tensor(self.packed.view(-1), self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.weight_dtype, self.blocksize, self.nested_absmax, self.nested_offset)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The (O, D) weight bitsandbytes' dequantize_4bit gives, cast to `dtype`."""
        return dequantize_nf4(self.quant_state()).to(dtype)

    def forward(self, x):
        y = NF4Matmul.apply(x.to(self.compute_dtype), self.quant_state(), self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(torch.bfloat16) would cast every float buffer: the float32 scales must only move
        scales = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for k, b in scales.items():
            self._buffers[k] = b.to(self._buffers[k].device)
        return self

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
            f"compute_dtype={self.compute_dtype}"


# -----------------------------------------------------------------------------
# Paged AdamW: optimizer state in CPU pages, a bounded share on the device


def adamw_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step in place (Loshchilov & Hutter, arXiv 1711.05101, Algorithm 2),
    in torch.optim.AdamW's order of operations so results agree to the bit:

        p = p * (1 - lr*wd);  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        p = p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)

    All operations are elementwise, so any slice of p, g, m, v may be updated on its own."""
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    p.addcdiv_(m, denom, value=-(lr / (1 - beta1**step)))


def paged_budget(free_bytes: int, total_bytes: int) -> int:
    """PagedAdamW's automatic budget on a GPU: the bytes free there less a margin of
    10% of the device or 1 GiB, whichever is larger (never below zero). It is taken
    at the first step, after the first forward and backward: PyTorch's caching
    allocator still holds what their activations took (reserved, so not free), so
    the state gets only memory the step itself did not need; the margin is left for
    fragmentation, a longer batch later, and other processes on the same GPU."""
    return max(0, free_bytes - max(total_bytes // 10, 1 << 30))


def device_budget(device: torch.device, page_bytes: int) -> float:
    """The automatic budget for state on `device`: paged_budget of the memory free
    on a CUDA device now, at least the two pages one update needs; unlimited
    anywhere else (on a CPU the pages' home already is the device)."""
    if device.type != "cuda":
        return math.inf
    free, total = torch.cuda.mem_get_info(device)
    return max(paged_budget(free, total), 2 * page_bytes)


class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose state (exp_avg, exp_avg_sq) lives in CPU pages of at most
    `page_bytes` (pinned for CUDA parameters). step() brings the pages it needs to
    the parameters' device, at most `device_budget_bytes` of them at once, the least
    recently used going back first; pages stay between steps, so a state within the
    budget never moves. None: automatic, fixed at the first step (device_budget). A
    budget given is kept on a CPU too, where pages are then copied and counted
    (`resident_bytes`, `peak_resident_bytes`). Copies are queued on the GPU's stream
    without stalling the host. We decide what moves and when; bitsandbytes' paged
    optimizers let the driver page CUDA unified memory. Either way the share is bounded."""
    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 page_bytes=1 << 20, device_budget_bytes=None):
        if device_budget_bytes is not None and device_budget_bytes < 2 * page_bytes:
            raise ValueError("device_budget_bytes must hold two pages (exp_avg and exp_avg_sq of a slice)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.page_bytes, self.device_budget_bytes = page_bytes, device_budget_bytes
        self.resident = OrderedDict()  # key -> (CPU page, device copy), least recently used first
        self.resident_bytes = self.peak_resident_bytes = 0

    def _new_pages(self, flat: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        # pinned pages let copies to and from a GPU run asynchronously; pinning also starts
        # a CUDA context, so only for parameters that live on a GPU (never in a --device cpu run)
        pin = device.type == "cuda"
        pages = flat.cpu().split(max(1, self.page_bytes // flat.element_size()))
        return [torch.empty(len(c), dtype=c.dtype, pin_memory=pin).copy_(c) for c in pages]

    def _page_in(self, key, page: torch.Tensor, device) -> torch.Tensor:
        if key in self.resident:
            self.resident.move_to_end(key)
            return self.resident[key][1]
        nbytes = page.numel() * page.element_size()
        while self.resident_bytes + nbytes > self.device_budget_bytes:
            _, (home, dev) = self.resident.popitem(last=False)
            self._write_back(home, dev)
            self.resident_bytes -= dev.numel() * dev.element_size()
        # no limit and already there (the CPU): a copy would only double the state's memory
        in_place = self.device_budget_bytes == math.inf and page.device == torch.device(device)
        # queued on the stream after the page's last write-back (the only writes to it), so never stale
        self.resident[key] = (page, page if in_place else page.to(device, non_blocking=True, copy=True))
        self.resident_bytes += nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        return self.resident[key][1]

    @staticmethod
    def _write_back(home: torch.Tensor, dev: torch.Tensor):
        # Queued after the updates that wrote dev, without waiting. Dropping dev at once is safe:
        # the caching allocator hands its memory only to work queued later on the same stream.
        # The host reads home only after flush has waited for the device.
        if dev is not home:
            home.copy_(dev, non_blocking=True)

    def flush(self):
        """Write every resident page back to its CPU page, free the device copies, and
        wait until the write-backs (these and any queued by earlier steps) have landed:
        after flush the CPU pages may be read (state_dict) or replaced (load_state_dict)."""
        for home, dev in self.resident.values():
            self._write_back(home, dev)
        for device in {p.device for g in self.param_groups for p in g["params"] if p.is_cuda}:
            torch.cuda.synchronize(device)
        self.resident, self.resident_bytes = OrderedDict(), 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if self.device_budget_bytes is None:  # automatic: fixed now, after a forward and backward
                    self.device_budget_bytes = device_budget(p.device, self.page_bytes)
                if not state:
                    state["step"] = torch.tensor(0.0)  # float32 on the CPU, as AdamW keeps it
                    zeros = torch.zeros(p.numel(), dtype=p.dtype)
                    state.update({k: self._new_pages(zeros, p.device) for k in self.MOMENTS})
                state["step"] += 1
                flat_p, flat_g, n = p.view(-1), p.grad.reshape(-1), len(state["exp_avg"][0])
                for j, (m_page, v_page) in enumerate(zip(state["exp_avg"], state["exp_avg_sq"])):
                    m = self._page_in((id(p), "exp_avg", j), m_page, p.device)
                    v = self._page_in((id(p), "exp_avg_sq", j), v_page, p.device)
                    sl = slice(j * n, j * n + len(m))  # every page but the last holds n values
                    adamw_update(flat_p[sl], flat_g[sl], m, v, state["step"].item(), group["lr"],
                                 beta1, beta2, group["eps"], group["weight_decay"])
        return loss

    def state_dict(self):
        """torch.optim.AdamW's format (whole exp_avg, exp_avg_sq): each resumes the other."""
        self.flush()
        sd, params = super().state_dict(), [p for g in self.param_groups for p in g["params"]]
        sd["state"] = {i: {"step": s["step"].clone(),
                           **{k: torch.cat(s[k]).view_as(params[i]) for k in self.MOMENTS}}
                       for i, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        self.flush()
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for g in self.param_groups for p in g["params"]]
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            step = torch.as_tensor(s["step"], dtype=torch.float32).detach().cpu().clone()
            flat = {k: s[k].detach().reshape(-1).to(p.dtype) for k in self.MOMENTS}
            pages = {k: self._new_pages(v, p.device) for k, v in flat.items()}
            self.state[p] = {"step": step, **pages}


# -----------------------------------------------------------------------------
# Quantizing while a checkpoint is read (llama.load_model(..., quantize="nf4"))
#
# A safetensors file is 8 bytes, the length of a JSON header (little-endian); the
# header, giving each tensor's dtype, shape and data_offsets (begin, end) into the
# bytes that follow it; then those bytes, each tensor's values in row-major order.
# So a weight can be read a slice at a time, each slice straight into memory of its
# own (safetensors reads a tensor whole, even for a slice of it, and through mmap
# its pages would stay in our RSS) and quantized at once (quantize_nf4_slices).

SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class SafetensorsSlices:
    """A safetensors file whose tensors are read a slice at a time. load_model opens
    the file with safetensors first, which checks the header and the file's size."""

    def __init__(self, fname: str):
        self.fname, self.file = fname, open(fname, "rb", buffering=0)
        n = int.from_bytes(self.file.read(8), "little")
        self.header, self.data_start = json.loads(self.file.read(n)), 8 + n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def shape(self, key: str) -> tuple:
        return tuple(self.header[key]["shape"])

    def slices(self, key: str, n: int):
        """The values of `key`, flat and in order, `n` at a time (the last slice
        may hold fewer), each a new tensor in the file's dtype."""
        info = self.header[key]
        dtype = SAFE_DTYPES.get(info["dtype"])
        if dtype is None:
            raise TuluError(f"{self.fname}: {key} is {info['dtype']}; a weight to quantize must be one of "
                            f"{', '.join(SAFE_DTYPES)}")
        begin, end = info["data_offsets"]
        step = n * dtype.itemsize
        for offset in range(begin, end, step):
            buf = torch.empty(min(step, end - offset), dtype=torch.uint8)
            self.file.seek(self.data_start + offset)
            if self.file.readinto(buf.numpy()) != buf.numel():
                raise TuluError(f"{self.fname}: ends inside {key} (truncated?)")
            yield buf.view(dtype)


@lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc (Linux)
    except (OSError, AttributeError):
        return None


def release_freed_memory():
    """Hand the memory of freed tensors back to the operating system where the C
    library can (glibc's malloc_trim; elsewhere nothing). glibc keeps freed blocks
    for reuse, and those between live tensors stay in our resident memory: a
    weight's slices and their temporaries left ~6 MiB of such holes each."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def load_nf4_linear(model: nn.Module, key: str, raw: SafetensorsSlices, dtype, device):
    """Read the decoder weight `key` from `raw` a slice at a time and put it in the
    model as a Linear4bit, in place of its meta nn.Linear: neither the weight nor
    whole-weight temporaries are ever in memory (read at once, a weight of
    Llama-2-7B's MLP is 86 MiB in bf16, and its quantizing temporaries as much
    again). Each slice is cast to `dtype` first, as transformers quantizes the
    weight it loaded in that dtype: the bytes are those of quantizing it whole."""
    parent_name, _, child = key.rpartition(".")[0].rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, child)
    check_shape(key, raw.shape(key), linear.weight.shape)
    slices = (s.to(device=device, dtype=dtype) for s in raw.slices(key, slice_size()))
    q = quantize_nf4_slices(slices, linear.weight.shape, dtype, device=device)
    setattr(parent, child, Linear4bit(q, linear.bias, compute_dtype=dtype))
    release_freed_memory()  # the slices', so that the peak stays the 4-bit model's
