"""Chapter 2: 4-bit NormalFloat weights and paged optimizer state.

What this file teaches: the three ideas of QLoRA (Dettmers et al. 2023, arXiv 2305.14314)
that let a 70B model be fine-tuned on one GPU, byte for byte as bitsandbytes stores them:
1. 4-bit NormalFloat (NF4): trained weights are close to normal, so the 16 code values are
   quantiles of N(0, 1); each block of 64 weights is scaled by its absolute maximum into
   [-1, 1] and each weight kept as the 4-bit index of its nearest code value.
2. Double quantization: a float32 scale per block costs 32/64 = 0.5 bit a weight; quantizing
   the scales to 8 bits in blocks of 256 brings the total to 4 + 8/64 + 32/(64*256) = 4.127.
3. Paged optimizers: AdamW's state lives in CPU pages; a step brings what it needs to the
   accelerator, never more than a fixed budget of it at once.
`Linear4bit` rebuilds its frozen 4-bit weight in bf16 inside forward and again in backward:
gradients reach the input (and chapter 3's LoRA adapters), never the weight. Then checkpoints:
quantized as they are read, a slice at a time, and bitsandbytes' 4-bit folders.

Shapes: N weights, Bk = N/64 blocks, D in and O out features. Read top to bottom.
"""
from __future__ import annotations

import io
import json
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama import TuluError, check_shape

# -----------------------------------------------------------------------------
# Code books: NF4 for the weights, the 8-bit dynamic map for their scales


def nf4_code_book(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 values, sorted, float32 (QLoRA section 3, "4-bit NormalFloat"):
        q = Phi^-1(p) for evenly spaced probabilities p, then q / max(q)
    Phi^-1 is N(0, 1)'s inverse CDF: each code value is a quantile, so a normal weight is equally
    likely to fall near any of them. 0 is a code value (zero weights and padding survive), with
    8 positive quantiles (9 points from `offset` down to 0.5, 0.5 dropped) and 7 negative ones (8
    points). Phi^-1(1) is infinite: the outermost point is offset = 0.9677083, the mean of 1 - 1/30
    and 1 - 1/32 (the centre of the last of 15 or of 16 equal-probability bins). Points are spaced
    and quantiles rounded in float32, as bitsandbytes built its table."""
    # exercise: nf4_code_book
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()
    code = torch.cat([neg, torch.zeros(1), pos]).sort().values
    return code / code.max()
    # end exercise


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (arXiv 1511.04561) for the double-quantized
    scales, 256 sorted float32 values in [-1, 1]: for e = 0..6, 2^e magnitudes 10^(e-6) * m, m the
    midpoints of 2^e equal steps from 0.1 to 1, both signs; then 0 and 1. Each decade has its own
    exponent: small values keep relative precision. Steps are spaced as torch.linspace did for
    bitsandbytes, with vector instructions (one fused multiply-add each), on any CPU."""
    vals, start = [torch.tensor([0.0, 1.0])], torch.tensor(0.1)
    for e in range(7):
        n = 2**e + 1
        step, i = ((1 - start) / (n - 1)).double(), torch.arange(n, dtype=torch.float64)  # step in float32
        edges = torch.where(i < n // 2, start.double() + step * i, 1 - step * (n - 1 - i)).float()  # fma
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)
        vals += [mids, -mids]
    return torch.cat(vals).sort().values


CODE_BOOKS: dict[torch.device, tuple] = {}  # code_books' (a dict, not lru_cache: torch.compile reads it)


def code_books(device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(NF4, NF4 pairs, DYNAMIC) on `device`, made at first use (so a student copy whose
    nf4_code_book is an exercise imports) and kept: 4-bit layers read them in every forward
    and backward. NF4 pairs, (256,) int64: each byte's two NF4 values (high nibble first)."""
    device = torch.device(device)
    if device not in CODE_BOOKS:
        nf4 = nf4_code_book()
        pairs = torch.stack([nf4.repeat_interleave(16), nf4.repeat(16)], dim=1).view(torch.int64)
        CODE_BOOKS[device] = tuple(t.to(device) for t in (nf4, pairs.view(256), dynamic_map()))
    return CODE_BOOKS[device]


ZERO_CODE = 7       # index of 0.0 in NF4: pads an odd count
DQ_BLOCKSIZE = 256  # blocks of scales in double quantization
SLICE = 2**16       # weights quantized at a time: 0.25 MB temporaries; whole blocks of 64 to 4096

# -----------------------------------------------------------------------------
# Blockwise absmax quantization, and NF4 with double quantization


def nearest_code(x: torch.Tensor, code: torch.Tensor, even_ties: bool = False) -> torch.Tensor:
    """Index (uint8) of the nearest value of the sorted `code` for each x. A tie goes to the lower
    code, as in bitsandbytes' NF4 kernels; with even_ties to the even index, where its CUDA
    kernel's binary search for 8-bit codes (from 127 in steps 64, .., 1) ends."""
    mids = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(x, mids, out_int32=True)  # mids[idx - 1] < x <= mids[idx]
    if even_ties:
        idx += (idx % 2 == 1) & (x == mids[idx.clamp(max=len(mids) - 1)])
    return idx.to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int, even_ties: bool = False):
    """Absmax quantization per block (QLoRA Eq. 1 with one constant per block):
        absmax_b = max |x_i| over block b;   c_i = nearest_code(x_i * (1 / absmax_b))
    x: (N,) float32 -> codes (N,) uint8, absmax (ceil(N/blocksize),) float32. A last, shorter
    block takes its own absmax. As bitsandbytes, x is multiplied by the reciprocal (a division
    can differ in the last bit and cross a midpoint); an all-zero block is scaled by 1/1e-38."""
    # exercise: quantize_blockwise
    n = x.numel()
    blocks = F.pad(x, (0, -n % blocksize)).view(-1, blocksize)  # zero padding never raises an absmax
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1 / absmax.clamp(min=1e-38))[:, None]
    return nearest_code(scaled.view(-1)[:n], code, even_ties), absmax
    # end exercise


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """x_i ~= code[c_i] * absmax_b for x_i in block b, the inverse of quantize_blockwise
    (QLoRA Eq. 2 with one constant per block). codes (N,) uint8 -> (N,) float32."""
    # exercise: dequantize_blockwise
    n = codes.numel()
    vals = F.pad(code[codes.int()], (0, -n % blocksize)).view(-1, blocksize)
    return (vals * absmax[:, None]).view(-1)[:n]
    # end exercise


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N,) -> (ceil(N/2),) uint8: two codes a byte, the first in the high nibble (bitsandbytes')."""
    codes = F.pad(codes, (0, codes.numel() % 2), value=ZERO_CODE)
    return codes[0::2] << 4 | codes[1::2]


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
    """The block scales quantized once more, to 8 bits in blocks of 256 (QLoRA section 3):
        offset = mean(absmax);  c2, nested_absmax = quantize_blockwise(absmax - offset, DYNAMIC, 256)
    Scales are positive: taking their mean out uses both signs of the 8-bit code. Ties go to even,
    as in bitsandbytes' CUDA kernel. (Bk,) -> c2 (Bk,) uint8, nested_absmax, offset."""
    dynamic = code_books(absmax.device)[2]
    # exercise: double_quant
    offset = absmax.mean()
    codes, nested_absmax = quantize_blockwise(absmax - offset, dynamic, DQ_BLOCKSIZE, even_ties=True)
    return codes, nested_absmax, offset
    # end exercise


def quantize_nf4_slices(slices, shape, dtype, blocksize: int = 64, double_quant: bool = True,
                        device="cpu") -> NF4Tensor:
    """quantize_nf4 on `device` of a weight of `shape` given as its flat values in slices of whole
    blocks (the last may be shorter), each quantized into place at once: temporaries are one
    slice's, and with slices read from a file (SafetensorsSlices) no float weight is ever whole."""
    n, nf4, done = math.prod(shape), code_books(device)[0], 0
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    for s in slices:
        assert done % (2 * blocksize) == 0, "only the last slice may be shorter"  # else it cut a block
        codes, scales = quantize_blockwise(s.float().reshape(-1), nf4, blocksize)
        packed[done // 2:done // 2 + (len(codes) + 1) // 2] = pack_nibbles(codes)
        absmax[done // blocksize:done // blocksize + len(scales)] = scales
        done += s.numel()
    q = NF4Tensor(packed, absmax, torch.Size(shape), dtype, blocksize)
    if double_quant:
        q.absmax, q.nested_absmax, q.nested_offset = double_quantize(q.absmax)
    return q


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """QLoRA's storage of a weight (section 3): the bytes of bitsandbytes'
    quantize_4bit(w, blocksize, compress_statistics=double_quant, quant_type="nf4")."""
    slices = w.detach().reshape(-1).split(SLICE)
    return quantize_nf4_slices(slices, w.shape, w.dtype, blocksize, double_quant, w.device)


def dequantize_nf4(q: NF4Tensor) -> torch.Tensor:
    """w ~= NF4[c] * absmax_b in float32, cast to q.dtype, after double-quantized scales are
    rebuilt: absmax = DYNAMIC[c2] * nested_absmax + offset (QLoRA Eq. 6). It runs in every
    forward and backward of a 4-bit layer, so a byte's two values are looked up at once:
    dequantize_blockwise of the unpacked codes, bit for bit, in a quarter of the time."""
    _, pairs, dynamic = code_books(q.packed.device)
    absmax = q.absmax if q.nested_absmax is None else (
        dequantize_blockwise(q.absmax, q.nested_absmax, dynamic, DQ_BLOCKSIZE) + q.nested_offset)
    n, vals = math.prod(q.shape), torch.empty(q.packed.numel(), dtype=torch.int64, device=q.packed.device)
    for part, out in zip(q.packed.view(-1).chunk(8), vals.chunk(8)):  # int32 codes an eighth at a time
        out.copy_(pairs.index_select(0, part.int()))
    vals = vals.view(torch.float32)[:n]  # (N,) NF4 values in order
    if n % q.blocksize:  # a shorter last block, padded to a whole one
        vals = F.pad(vals, (0, -n % q.blocksize))
    w = vals.view(-1, q.blocksize).mul_(absmax[:, None])
    return w.view(-1)[:n].view(q.shape).to(q.dtype)


# -----------------------------------------------------------------------------
# Linear4bit: a frozen NF4 weight inside the model


class NF4Matmul(torch.autograd.Function):
    """y = x W^T and dx = dy W for W = dequantize_nf4(q) in `dtype` (QLoRA Eq. 5 without its
    LoRA term). W is frozen and rebuilt in backward, not saved: only the 4-bit weight is kept."""

    @staticmethod
    def forward(ctx, x, q, dtype):
        ctx.q, ctx.dtype = q, dtype
        return F.linear(x, dequantize_nf4(q).to(dtype))

    @staticmethod
    def backward(ctx, dy):
        return dy @ dequantize_nf4(ctx.q).to(ctx.dtype), None, None


class Linear4bit(nn.Module):
    """A frozen nn.Linear whose weight is held in NF4 as buffers, so `.to(device)` moves it.
    forward computes x W^T + b in compute_dtype, cast back to x's dtype (as bitsandbytes)."""

    def __init__(self, q: NF4Tensor, bias=None, compute_dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.compute_dtype, self.weight_dtype, self.blocksize = compute_dtype, q.dtype, q.blocksize
        for name in ("packed", "absmax", "nested_absmax", "nested_offset"):
            self.register_buffer(name, getattr(q, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype=torch.bfloat16) -> "Linear4bit":
        return cls(quantize_nf4(linear.weight), linear.bias, compute_dtype)

    def quant_state(self) -> NF4Tensor:
        # packed is (blocks, 32) under FSDP (machinery/distributed.py)
        return NF4Tensor(self.packed.view(-1), self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.weight_dtype, self.blocksize, self.nested_absmax, self.nested_offset)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:  # bitsandbytes' dequantize_4bit, cast
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


# -----------------------------------------------------------------------------
# Paged AdamW: optimizer state in CPU pages, a bounded share on the device


def adamw_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step in place (arXiv 1711.05101, Algorithm 2), in torch.optim.AdamW's order:
        p = p * (1 - lr*wd);  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        p = p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
    Elementwise, bit for bit AdamW's: any slice of p, g, m, v may be updated on its own."""
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    p.addcdiv_(m, denom, value=-(lr / (1 - beta1**step)))


def device_budget(device: torch.device, page_bytes: int) -> float:
    """PagedAdamW's budget, taken at its first step (so the state gets memory that a forward and
    backward did not need): unlimited but on a GPU; there free bytes less 10% of it or 1 GiB."""
    if device.type != "cuda":
        return math.inf
    free, total = torch.cuda.mem_get_info(device)
    return max(free - max(total // 10, 1 << 30), 2 * page_bytes)


class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose state lives on the CPU in pages of at most `page_bytes`. step() brings the pages
    it needs to the parameters' device, at most `device_budget_bytes` at once (None: device_budget),
    the least recently used going back first, the copies queued without stalling the host; pages
    stay between steps. (bitsandbytes lets the driver page CUDA unified memory; we decide what moves.)"""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 page_bytes=1 << 20, device_budget_bytes=None):
        if device_budget_bytes is not None and device_budget_bytes < 2 * page_bytes:
            raise ValueError("device_budget_bytes must hold two pages (exp_avg and exp_avg_sq of a slice)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.page_bytes, self.device_budget_bytes = page_bytes, device_budget_bytes
        self.resident = OrderedDict()  # key -> (CPU page, device copy), least recently used first
        self.resident_bytes = self.peak_resident_bytes = 0

    @staticmethod
    def _home(p: torch.Tensor) -> torch.Tensor:
        # zeros like p on the CPU, pinned for a GPU parameter (asynchronous copies; pinning starts CUDA)
        return torch.zeros(p.shape, dtype=p.dtype, pin_memory=p.device.type == "cuda")

    def _page_out(self, limit: float):
        """Send the least recently used pages home until at most `limit` bytes stay."""
        while self.resident and self.resident_bytes > limit:
            _, (home, dev) = self.resident.popitem(last=False)
            if dev is not home:  # queued after the updates that wrote dev; the caching allocator
                home.copy_(dev, non_blocking=True)  # hands dev's memory only to work queued later
            self.resident_bytes -= dev.numel() * dev.element_size()

    def _page_in(self, page: torch.Tensor, device) -> torch.Tensor:
        key = page.data_ptr()  # where the page lives at home: one key for it at every step
        if key not in self.resident:
            nbytes = page.numel() * page.element_size()
            self._page_out(self.device_budget_bytes - nbytes)
            same = self.device_budget_bytes == math.inf and page.device == torch.device(device)  # a CPU
            self.resident[key] = (page, page if same else page.to(device, non_blocking=True, copy=True))
            self.resident_bytes += nbytes
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        self.resident.move_to_end(key)
        return self.resident[key][1]

    def flush(self):
        """Send every page home and wait for the copies: then the CPU state may be read."""
        self._page_out(0)
        for device in {p.device for g in self.param_groups for p in g["params"] if p.is_cuda}:
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                if self.device_budget_bytes is None:  # automatic: fixed now, after a forward and backward
                    self.device_budget_bytes = device_budget(p.device, self.page_bytes)
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=self._home(p), exp_avg_sq=self._home(p))
                state["step"] += 1  # float32 on the CPU, as AdamW keeps it
                n = max(1, self.page_bytes // p.element_size())  # values a page
                flat = [t.view(-1) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for p_j, g_j, m_j, v_j in zip(*(t.split(n) for t in flat)):
                    m, v = self._page_in(m_j, p.device), self._page_in(v_j, p.device)
                    adamw_update(p_j, g_j, m, v, state["step"].item(), group["lr"], *group["betas"],
                                 group["eps"], group["weight_decay"])

    def state_dict(self):
        """torch.optim.AdamW's format, in which the state is kept: each resumes the other."""
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        self.flush()
        super().load_state_dict({**state_dict, "state": {}})  # it would put the state on the GPU
        params = [p for g in self.param_groups for p in g["params"]]
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            moments = {k: self._home(p).copy_(s[k].reshape(p.shape)) for k in ("exp_avg", "exp_avg_sq")}
            self.state[p] = {"step": torch.as_tensor(s["step"], dtype=torch.float32).cpu().clone(), **moments}


# -----------------------------------------------------------------------------
# Quantizing while a checkpoint is read (llama.load_model(..., quantize="nf4"))
#
# A safetensors file: 8 bytes, the length of a JSON header; the header, each tensor's dtype, shape
# and data_offsets into the bytes that follow; those bytes, row-major. So a weight can be read a
# slice at a time into memory of its own (safetensors reads a tensor whole even for a slice).

SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class SafetensorsSlices(io.FileIO):
    """A safetensors file open for reading, its header parsed (safetensors checked it first)."""

    def __init__(self, fname: str):
        super().__init__(fname, "rb")
        n = int.from_bytes(self.read(8), "little")
        self.header, self.data_start = json.loads(self.read(n)), 8 + n

    def slices(self, key: str, n: int):
        """The values of `key` in order, `n` at a time, each a new tensor in the file's dtype."""
        info = self.header[key]
        if info["dtype"] not in SAFE_DTYPES:
            raise TuluError(f"{self.name}: {key} is {info['dtype']}, not one of {', '.join(SAFE_DTYPES)}")
        dtype, (begin, end) = SAFE_DTYPES[info["dtype"]], info["data_offsets"]
        for offset in range(begin, end, n * dtype.itemsize):
            self.seek(self.data_start + offset)
            yield torch.frombuffer(bytearray(self.read(min(n * dtype.itemsize, end - offset))), dtype=dtype)

    def read_nf4(self, key: str, dtype=None, device="cpu") -> NF4Tensor:
        """quantize_nf4 of the weight `key` read a slice at a time, each cast to `dtype` first (None:
        the file's), as transformers quantizes what it loaded: no whole weight is in memory."""
        dtype = dtype or SAFE_DTYPES.get(self.header[key]["dtype"])  # None: slices raises
        slices = (s.to(device=device, dtype=dtype) for s in self.slices(key, SLICE))
        return quantize_nf4_slices(slices, self.header[key]["shape"], dtype, device=device)


def set_linear4bit(model: nn.Module, key: str, q: NF4Tensor, dtype):
    """A Linear4bit of q computing in `dtype` in place of the model's linear layer of weight `key`."""
    linear = model.get_submodule(key.removesuffix(".weight"))
    check_shape(key, q.shape, linear.weight.shape)
    model.set_submodule(key.removesuffix(".weight"), Linear4bit(q, linear.bias, compute_dtype=dtype))


# -----------------------------------------------------------------------------
# bitsandbytes 4-bit folders (transformers' load_in_4bit, then save_pretrained)
#
# transformers saves a bitsandbytes Linear4bit as the fields of an NF4Tensor: WEIGHT (the packed
# codes, uint8 (N/2, 1)), WEIGHT.absmax (double-quantized: their codes, and WEIGHT.nested_absmax),
# the code books (WEIGHT.quant_map, WEIGHT.nested_quant_map), the rest as JSON in the bytes of
# WEIGHT.quant_state.bitsandbytes__nf4; config.json has a quantization_config. (machinery/quantize.py
# writes such folders.)

BNB_STATE = "quant_state.bitsandbytes__nf4"
BNB_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", "." + BNB_STATE)
BNB_CONFIG = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
              "bnb_4bit_quant_type": "nf4", "bnb_4bit_quant_storage": "uint8"}


def check_bnb_config(config: dict, source: str):
    """What tulu reads: bitsandbytes' 4-bit NF4, with or without double quantization."""
    for field, want in BNB_CONFIG.items():
        if config.get(field, want) != want:
            raise TuluError(f"{source}: quantization_config {field} {config[field]!r} is not supported (only "
                            f"bitsandbytes 4-bit NF4: {field} {json.dumps(want)})")


def load_bnb_linears(model: nn.Module, tensors: dict[str, torch.Tensor], dtype, source: str):
    """Each 4-bit weight in `tensors` (what was read of the bitsandbytes folder `source` besides the
    model's parameters), its parts taken out, into the model as a Linear4bit: the same bytes. It
    dequantizes to `dtype`, as bitsandbytes 0.50 does (the JSON's dtype is the original's)."""
    for key in [k for k in tensors if not k.endswith(BNB_PARTS)]:
        part = lambda name, key=key: tensors.pop(key + name)
        try:
            state, _ = json.loads(bytes(part("." + BNB_STATE).tolist())), part(".quant_map")
            q = NF4Tensor(part("").view(-1), part(".absmax"), state["shape"], dtype, state["blocksize"])
            if "nested_offset" in state:
                q.nested_absmax, _ = part(".nested_absmax"), part(".nested_quant_map")
                q.nested_offset = torch.tensor(state["nested_offset"], device=q.packed.device)
        except KeyError as e:
            raise TuluError(f"{source}: checkpoint lacks {e.args[0]} (a part of the 4-bit {key})") from None
        set_linear4bit(model, key, q, dtype)
    if tensors:  # a part of no weight
        raise TuluError(f"{source}: unexpected tensor {next(iter(tensors))} (not a Llama checkpoint?)")
