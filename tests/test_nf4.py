"""nf4.py against bitsandbytes and transformers (golden files from
tests/make_fixtures.py), plus the invariants a student can check by hand."""
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import llama
import nf4
from nf4 import Linear4bit, PagedAdamW, dequantize_nf4, quantize_nf4

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
REF = load_file(os.path.join(FIX, "nf4", "quantized.safetensors"))
CASES = sorted({k.split(".")[0] for k in REF} - {"scales"})  # e.g. randn_fp32, outliers_bf16


def nf4_table():
    return nf4.code_books()[0]


def dynamic_table():
    return nf4.code_books()[2]


def unpack_nibbles(packed, n):
    """pack_nibbles undone: the high nibble first. (ceil(n/2),) uint8 -> (n,) uint8."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n]


# -----------------------------------------------------------------------------
# Code books


def test_nf4_code_book_matches_bitsandbytes():
    code = nf4.nf4_code_book()
    assert torch.equal(code, load_file(os.path.join(FIX, "nf4", "code_books.safetensors"))["nf4"])
    # exact zero, 7 negative and 8 positive values, spanning [-1, 1]
    assert code[nf4.ZERO_CODE] == 0 and (code < 0).sum() == 7 and (code > 0).sum() == 8
    assert code[0] == -1 and code[-1] == 1 and (code[1:] > code[:-1]).all()


def test_nf4_code_book_values_are_normal_quantiles():
    """Each positive value is Phi^-1(p) / Phi^-1(offset) for p evenly spaced from
    0.5 to offset: Phi(value * Phi^-1(offset)) gives the p back."""
    code, top = nf4.nf4_code_book().double(), torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64))
    p = torch.special.ndtr(code[8:] * top)
    torch.testing.assert_close(p, torch.linspace(0.5, 0.9677083, 9, dtype=torch.float64)[1:], atol=1e-6, rtol=0)


def test_dynamic_map_matches_bitsandbytes():
    """bitsandbytes' table, as it builds it with torch.linspace on a machine with
    vector instructions (the fixture's): bit for bit on any machine."""
    dyn = nf4.dynamic_map()
    assert torch.equal(dyn, load_file(os.path.join(FIX, "nf4", "code_books.safetensors"))["dynamic"])
    assert dyn.numel() == 256 and (dyn == 0).sum() == 1 and dyn.max() == 1


# -----------------------------------------------------------------------------
# Blockwise quantization, against bitsandbytes


@pytest.mark.parametrize("case", CASES)
def test_quantize_nf4_matches_bitsandbytes(case):
    w = REF[f"{case}.w"]
    q = quantize_nf4(w, blocksize=64, double_quant=False)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == math.ceil(w.numel() / 2)
    assert torch.equal(q.packed, REF[f"{case}.packed"])
    assert torch.equal(q.absmax, REF[f"{case}.absmax"])
    out = dequantize_nf4(q)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(out, REF[f"{case}.dequant"])


@pytest.mark.parametrize("case", CASES)
def test_quantize_nf4_double_quant_matches_bitsandbytes(case):
    """Reference codes for the scales are bitsandbytes' exact-rounding kernel (see
    make_fixtures.nf4_exact_absmax_codes); the 4-bit bytes do not depend on it."""
    w = REF[f"{case}.w"]
    q = quantize_nf4(w)
    assert torch.equal(q.packed, REF[f"{case}.packed"])
    assert q.absmax.dtype == torch.uint8 and torch.equal(q.absmax, REF[f"{case}.dq_absmax"])
    assert torch.equal(q.nested_absmax, REF[f"{case}.dq_nested_absmax"])
    assert torch.equal(q.nested_offset, REF[f"{case}.dq_nested_offset"])
    out = dequantize_nf4(q)
    assert out.dtype == w.dtype and torch.equal(out, REF[f"{case}.dq_dequant"])


def test_quantize_blockwise_8bit_scales_match_bitsandbytes():
    x = REF["scales.x"]
    codes, absmax = nf4.quantize_blockwise(x, dynamic_table(), 256, even_ties=True)  # as quantize_nf4
    assert torch.equal(codes, REF["scales.codes"]) and torch.equal(absmax, REF["scales.absmax"])


@pytest.mark.parametrize("case", CASES)
def test_quantize_blockwise_nf4_codes_match_bitsandbytes(case):
    """The blockwise step alone, with bitsandbytes' own NF4 table: its codes and absmax."""
    code = load_file(os.path.join(FIX, "nf4", "code_books.safetensors"))["nf4"]
    w = REF[f"{case}.w"]
    codes, absmax = nf4.quantize_blockwise(w.float().reshape(-1), code, 64)
    assert codes.dtype == torch.uint8 and codes.shape == (w.numel(),)
    assert torch.equal(nf4.pack_nibbles(codes), REF[f"{case}.packed"]) and torch.equal(absmax, REF[f"{case}.absmax"])


@pytest.mark.parametrize("case", CASES)
def test_dequantize_blockwise_matches_bitsandbytes(case):
    """bitsandbytes' codes and absmax, with its NF4 table, give back its dequantized weight."""
    code = load_file(os.path.join(FIX, "nf4", "code_books.safetensors"))["nf4"]
    w = REF[f"{case}.w"]
    codes = unpack_nibbles(REF[f"{case}.packed"], w.numel())
    out = nf4.dequantize_blockwise(codes, REF[f"{case}.absmax"], code, 64)
    assert out.dtype == torch.float32 and out.shape == (w.numel(),)
    assert torch.equal(out.view(w.shape).to(w.dtype), REF[f"{case}.dequant"])


def test_code_books_are_copied_to_a_device_once(monkeypatch):
    """On a GPU a table copied at each call is a blocking transfer in every 4-bit layer's
    forward and backward. The 'meta' device stands in for the GPU: the first dequantize_nf4
    may copy the code books there, later calls reuse those copies (no CPU tensor moves)."""
    meta = dict(device="meta")  # made-up bytes and scales: only where the tables go matters here
    q = nf4.NF4Tensor(torch.empty(256, dtype=torch.uint8, **meta), torch.empty(8, dtype=torch.uint8, **meta),
                      torch.Size((8, 64)), torch.float32, 64, torch.empty(1, **meta), torch.empty((), **meta))
    assert dequantize_nf4(q).is_meta  # warm: one copy of each table
    copies, to = [], torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: (
        copies.append(1) if not t.is_meta else None) or to(t, *a, **k))
    for _ in range(3):
        assert dequantize_nf4(q).is_meta
    assert copies == [] and all(t.is_meta for t in nf4.code_books("meta"))


@pytest.mark.parametrize("case", CASES)
def test_double_quantize_scales_match_bitsandbytes(case):
    """bitsandbytes' float32 block scales, quantized once more: its 8-bit codes (exact
    rounding, see test_quantize_nf4_double_quant_matches_bitsandbytes), scales and offset."""
    c2, nested_absmax, offset = nf4.double_quantize(REF[f"{case}.absmax"])
    assert c2.dtype == torch.uint8 and torch.equal(c2, REF[f"{case}.dq_absmax"])
    assert torch.equal(nested_absmax, REF[f"{case}.dq_nested_absmax"])
    assert torch.equal(offset, REF[f"{case}.dq_nested_offset"])


def test_bitsandbytes_cpu_lookup_table_is_sometimes_not_nearest():
    """bitsandbytes 0.50's CPU kernel picks 8-bit codes from a lookup table. Where
    it disagrees with us (rarely), our code is strictly nearer to the scaled value."""
    x, lut = REF["scales.x"], REF["scales.codes_bnb_cpu"]
    ours, _ = nf4.quantize_blockwise(x, dynamic_table(), nf4.DQ_BLOCKSIZE, even_ties=True)  # as quantize_nf4
    assert torch.equal(ours, REF["scales.codes"])  # bitsandbytes' exact-rounding kernel
    differ = ours != lut
    assert 0 < differ.sum() < 0.01 * x.numel()
    scaled = (x.view(-1, nf4.DQ_BLOCKSIZE) * (1 / REF["scales.absmax"][:, None])).view(-1)[differ].double()
    dyn = dynamic_table().double()
    assert ((dyn[ours[differ].long()] - scaled).abs() < (dyn[lut[differ].long()] - scaled).abs()).all()


def test_nearest_code_equals_argmin_and_ties_go_low():
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    naive = (x[:, None] - nf4_table()[None, :]).abs().argmin(dim=1)  # first minimum on a tie
    assert torch.equal(nf4.nearest_code(x, nf4_table()).long(), naive)
    mids = (nf4_table()[:-1] + nf4_table()[1:]) / 2
    assert torch.equal(nf4.nearest_code(mids, nf4_table()).long(), torch.arange(15))


def test_nearest_code_even_ties_for_8bit_codes():
    """bitsandbytes' CUDA kernel finds an 8-bit code by binary search from index 127
    in steps 64, 32, .., 1: it always ends on an even index and keeps it on a tie.
    Off the midpoints the rule changes nothing."""
    mids = (dynamic_table()[:-1] + dynamic_table()[1:]) / 2
    low = torch.arange(255)
    assert torch.equal(nf4.nearest_code(mids, dynamic_table(), even_ties=True).long(), low + low % 2)
    x = REF["scales.x"] * (1 / REF["scales.absmax"]).repeat_interleave(nf4.DQ_BLOCKSIZE)
    dyn = dynamic_table()
    assert torch.equal(nf4.nearest_code(x, dyn, even_ties=True), nf4.nearest_code(x, dyn))


def test_nearest_code_ties_and_reciprocal_as_bitsandbytes():
    """crafted_fp32: block 0 holds 1.0 and the 15 midpoints between NF4 values
    (ties); blocks 1.. hold (a, x) with x/a and x*(1/a) on two sides of a
    midpoint. bitsandbytes sends each tie to the lower code and follows the
    reciprocal; a division would have given other codes."""
    bnb_ties = unpack_nibbles(REF["crafted_fp32.packed"][:8], 16)
    ours, _ = nf4.quantize_blockwise(REF["crafted_fp32.w"].view(-1)[:64], nf4_table(), 64)
    assert bnb_ties.tolist() == ours[:16].tolist() == [15] + list(range(15))
    w = REF["crafted_fp32.w"].view(-1, 64)[1:]
    a, x = w[:, 0], w[:, 1]
    packed = REF["crafted_fp32.packed"].view(-1, 32)[1:]
    bnb_code = (packed[:, 0] & 0xF).long()  # x is the second value of its block: low nibble
    ours, _ = nf4.quantize_blockwise(w.reshape(-1), nf4_table(), 64)
    assert torch.equal(ours.view(-1, 64)[:, 1].long(), bnb_code)
    assert torch.equal(bnb_code, nf4.nearest_code(x * (1 / a), nf4_table()).long())
    assert (bnb_code != nf4.nearest_code(x / a, nf4_table()).long()).all()


@pytest.mark.parametrize("slice_size", [128, 4096])
def test_quantize_nf4_in_slices_equals_whole(monkeypatch, slice_size):
    """quantize_nf4 works through long weights nf4.SLICE weights at a time (here
    fewer, so the test stays small); the bytes are those of quantizing the whole at once."""
    monkeypatch.setattr(nf4, "SLICE", slice_size)
    w = torch.randn(3 * 4096 + 1000 + 33).bfloat16()
    codes, absmax = nf4.quantize_blockwise(w.float(), nf4_table(), 64)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.packed, nf4.pack_nibbles(codes)) and torch.equal(q.absmax, absmax)


def test_quantize_nf4_slices_refuses_a_cut_block():
    """Only the last slice may be shorter: a short one before it would cut a block."""
    w = torch.randn(512)
    assert torch.equal(nf4.quantize_nf4_slices([w[:128], w[128:]], w.shape, w.dtype).packed, quantize_nf4(w).packed)
    with pytest.raises(AssertionError, match="only the last slice"):
        nf4.quantize_nf4_slices([w[:100], w[100:]], w.shape, w.dtype)


def test_pack_nibbles_order():
    # earlier code in the high nibble; an odd count padded with the zero code 7
    packed = nf4.pack_nibbles(torch.tensor([1, 2, 3], dtype=torch.uint8))
    assert packed.tolist() == [0x12, 0x30 | nf4.ZERO_CODE]
    assert unpack_nibbles(packed, 3).tolist() == [1, 2, 3]


def bits_per_param(q):
    stored = [q.packed, q.absmax, q.nested_absmax, q.nested_offset]
    return sum(8 * t.numel() * t.element_size() for t in stored if t is not None) / math.prod(q.shape)


def test_bits_per_param():
    """QLoRA section 3: 4 bits a weight, 8 bits per 64-weight block, 32 bits per 256
    blocks, and one 32-bit offset: 4 + 8/64 + 32/(64*256) + 32/N, about 4.127 bits;
    without double quantization 4 + 32/64 = 4.5."""
    w = torch.randn(512, 512)
    q = quantize_nf4(w)
    assert q.packed.dtype == q.absmax.dtype == torch.uint8 and q.nested_absmax.dtype == torch.float32
    assert bits_per_param(q) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel())
    assert bits_per_param(q) < 4.13
    assert bits_per_param(quantize_nf4(w, double_quant=False)) == 4 + 32 / 64


def test_dequantize_nf4_error_bound():
    """Without double quantization each weight is off by at most half the widest
    gap between neighbouring NF4 values, times its block's absmax."""
    w = torch.randn(96, 80) * torch.logspace(-3, 1, 96)[:, None]
    q = quantize_nf4(w, double_quant=False)
    half_gap = (nf4_table()[1:] - nf4_table()[:-1]).max() / 2
    bound = (half_gap * q.absmax).repeat_interleave(64)
    assert ((dequantize_nf4(q) - w).abs().view(-1) <= bound * (1 + 1e-6)).all()


def test_nf4_beats_int4_on_normal_weights():
    """The point of NF4 (QLoRA section 3): for normal weights, 16 normal quantiles
    lose less than 16 evenly spaced levels with the same blocks and scales."""
    w = torch.randn(1000 * 64, generator=torch.Generator().manual_seed(0))
    int4 = torch.arange(-7, 8) / 7
    err = {}
    for name, code in (("nf4", nf4_table()), ("int4", int4)):
        codes, absmax = nf4.quantize_blockwise(w, code, 64)
        err[name] = (nf4.dequantize_blockwise(codes, absmax, code, 64) - w).pow(2).mean()
    assert err["nf4"] < err["int4"]


# -----------------------------------------------------------------------------
# Linear4bit


def make_layer(dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return Linear4bit.from_linear(nn.Linear(96, 40, bias=bias), compute_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_forward_equals_dequantized_matmul(dtype):
    layer = make_layer(dtype)
    x = torch.randn(3, 5, 96)
    w = dequantize_nf4(layer.quant_state()).to(dtype)
    y = layer(x.to(dtype))
    assert y.dtype == dtype and torch.equal(y, x.to(dtype) @ w.T + layer.bias.to(dtype))
    assert layer(x).dtype == torch.float32  # cast back to the input's dtype, as bitsandbytes


@pytest.mark.parametrize("case", [c for c in CASES if REF[f"{c}.w"].dim() == 2])
def test_linear4bit_dequantize_gives_bitsandbytes_weight(case):
    """A layer made from a fixture weight holds bitsandbytes' double-quantized weight."""
    w = REF[f"{case}.w"]
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    linear.weight.data.copy_(w)
    layer = Linear4bit.from_linear(linear, compute_dtype=w.dtype)
    assert torch.equal(layer.packed, REF[f"{case}.packed"])
    assert torch.equal(layer.dequantize(w.dtype), REF[f"{case}.dq_dequant"])


def test_linear4bit_backward_input_grad_only():
    layer = make_layer()
    x = torch.randn(4, 7, 96, requires_grad=True)
    dy = torch.randn(4, 7, 40)
    layer(x).backward(dy)
    w = dequantize_nf4(layer.quant_state())
    x2 = x.detach().clone().requires_grad_()
    (x2 @ w.T + layer.bias).backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())
    assert all(p.grad is None for p in layer.parameters())


def saved_for_backward(fn):
    """Shapes of the tensors autograd keeps from forward for backward while fn runs."""
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        fn()
    return shapes


def test_linear4bit_does_not_keep_dequantized_weight_for_backward():
    """F.linear(x, W) keeps W (O, D) for the input gradient; Linear4bit keeps nothing
    of that size and dequantizes again in backward."""
    layer = make_layer(bias=False)
    x = torch.randn(2, 96, requires_grad=True)
    plain = saved_for_backward(lambda: torch.nn.functional.linear(x, layer.dequantize()))
    ours = saved_for_backward(lambda: layer(x))
    assert {(40, 96), (96, 40)} & set(plain) and not {(40, 96), (96, 40)} & set(ours)


def test_linear4bit_to_dtype_keeps_float32_scales():
    layer = make_layer()
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.nested_absmax.dtype == torch.float32 and layer.nested_offset.dtype == torch.float32
    assert torch.equal(layer.dequantize(), before) and layer.bias.dtype == torch.bfloat16


def test_linear4bit_state_dict_round_trip():
    a, b = make_layer(seed=0), make_layer(seed=1)
    assert set(a.state_dict()) == {"packed", "absmax", "nested_absmax", "nested_offset", "bias"}
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.dequantize(), b.dequantize())


# -----------------------------------------------------------------------------
# Quantize while loading


def test_load_model_nf4_matches_transformers_bitsandbytes():
    ref = load_file(os.path.join(FIX, "nf4", "gqa_nf4_expected.safetensors"))
    model = llama.load_model(os.path.join(FIX, "llama", "gqa"), dtype=torch.float32, quantize="nf4")
    for name, m in model.named_modules():
        if name.endswith("_proj"):
            assert isinstance(m, Linear4bit), name
    assert isinstance(model.lm_head, nn.Linear) and model.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input_ids"]), ref["logits"], atol=1e-4, rtol=0)


def test_load_model_nf4_quantizes_the_load_dtype_copy():
    """Loaded in bf16, each weight is cast to bf16 first and quantized from that,
    as transformers does: its stored NF4 state equals ours key for key."""
    ref = load_file(os.path.join(FIX, "nf4", "gqa_nf4_expected.safetensors"))
    model = llama.load_model(os.path.join(FIX, "llama", "gqa"), dtype=torch.bfloat16, quantize="nf4")
    sd = model.state_dict()
    keys = [k for k in ref if k.endswith((".packed", "absmax", ".nested_offset"))]
    assert len(keys) == 4 * 7 * model.config.num_hidden_layers
    for k in keys:
        assert torch.equal(sd[k], ref[k]), k
    assert model.model.layers[0].mlp.up_proj.weight_dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_model_nf4_reads_each_weight_in_slices(monkeypatch, dtype):
    """load_model(quantize="nf4") reads each decoder weight straight from the file
    nf4.SLICE values at a time, never whole (here slices of 2 blocks, so
    every weight is cut in many), and its 4-bit state is bit for bit that of
    quantizing the whole weight, loaded in `dtype`, at once."""
    path = os.path.join(FIX, "llama", "gqa")
    plain = llama.load_model(path, dtype=dtype)
    monkeypatch.setattr(nf4, "SLICE", 128)
    sizes, read = [], nf4.SafetensorsSlices.slices

    def slices(self, key, n):
        for s in read(self, key, n):
            sizes.append(s.numel())
            yield s
    monkeypatch.setattr(nf4.SafetensorsSlices, "slices", slices)
    model = llama.load_model(path, dtype=dtype, quantize="nf4")
    weights = {n: p for n, p in plain.named_parameters() if llama.decoder_linear(n)}
    assert max(sizes) == 128 and sum(sizes) == sum(w.numel() for w in weights.values())
    monkeypatch.setattr(nf4, "SLICE", 2**30)  # the reference: each weight quantized in one piece
    for name, w in weights.items():
        got, want = model.get_submodule(name.rpartition(".")[0]).quant_state(), quantize_nf4(w)
        for field in ("packed", "absmax", "nested_absmax", "nested_offset"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (name, field)
        assert got.dtype == dtype


def test_safetensors_slices_reads_in_order_and_refuses_what_it_cannot_quantize(tmp_path):
    """slices(key, n) gives a tensor's values in order, n at a time; a weight stored as
    integers (a checkpoint quantized already) is a one-line error naming the file."""
    from safetensors.torch import save_file
    fname = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(4, 4, dtype=torch.int8), "x": torch.arange(300.0).bfloat16()}, fname)
    with nf4.SafetensorsSlices(fname) as raw:
        got = list(raw.slices("x", 128))
        assert [len(s) for s in got] == [128, 128, 44] and torch.equal(torch.cat(got), torch.arange(300.0).bfloat16())
        with pytest.raises(llama.TuluError, match=f"{fname}: w is I8, not one of F64, F32, F16, BF16"):
            next(raw.slices("w", 128))


def test_load_model_nf4_closer_to_full_precision_than_int4():
    """The 4-bit model's logits stay near the full-precision ones (fixture from
    transformers), nearer than with 4-bit integers in the same blocks."""
    path = os.path.join(FIX, "llama", "gqa")
    ref = load_file(os.path.join(FIX, "llama", "gqa_expected.safetensors"))
    int4 = torch.arange(-7, 8) / 7
    model = llama.load_model(path, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if llama.decoder_linear(name):
                codes, absmax = nf4.quantize_blockwise(p.view(-1), int4, 64)
                p.copy_(nf4.dequantize_blockwise(codes, absmax, int4, 64).view_as(p))
        err_int4 = (model(ref["input_ids"]) - ref["logits"]).norm()
        model = llama.load_model(path, dtype=torch.float32, quantize="nf4")
        err_nf4 = (model(ref["input_ids"]) - ref["logits"]).norm()
    assert err_nf4 < err_int4 < ref["logits"].norm()


# -----------------------------------------------------------------------------
# PagedAdamW


def train(make_opt, steps=25, dtype=torch.float32, resume_at=None, resume_with=None):
    """`steps` AdamW steps on fixed random gradients, lr changed each step by a
    scheduler; params sized so pages do not divide them. After step `resume_at`
    the optimizer is rebuilt (by `resume_with`, default make_opt) from its state dict."""
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in [(37, 53), (1001,), (7,), (3, 129)]]
    opt = make_opt(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.95**t)
    for t in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * (t + 1)).to(dtype)
        opt.step()
        sched.step()
        if t == resume_at:
            sd, ssd = opt.state_dict(), sched.state_dict()
            opt = (resume_with or make_opt)(params)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.95**t)
            opt.load_state_dict(sd)  # after the scheduler is built: building it resets lr
            sched.load_state_dict(ssd)
    return params, opt


KW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
PAGE = 4 * 97  # bytes: 97 float32 values, dividing none of the sizes above


def adamw(ps):
    return torch.optim.AdamW(ps, foreach=False, **KW)


def paged(ps):
    return PagedAdamW(ps, page_bytes=PAGE, device_budget_bytes=5 * PAGE, **KW)


def test_adamw_update_by_slices_equals_torch_adamw():
    """adamw_update on two halves of the tensors gives torch.optim.AdamW's step, bit for bit."""
    p0, g = torch.randn(1001), torch.randn(1001)
    p, ref = p0.clone(), nn.Parameter(p0.clone())
    m, v = torch.zeros(1001), torch.zeros(1001)
    opt = adamw([ref])
    for step in (1, 2, 3):
        ref.grad = g * step
        opt.step()
        for sl in (slice(0, 500), slice(500, None)):
            nf4.adamw_update(p[sl], g[sl] * step, m[sl], v[sl], float(step), KW["lr"], *KW["betas"],
                             KW["eps"], KW["weight_decay"])
    assert torch.equal(p, ref.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_adamw_equals_adamw_bit_for_bit(dtype):
    ref, _ = train(adamw, dtype=dtype)
    out, opt = train(paged, dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    state_bytes = sum(2 * p.numel() * p.element_size() for p in out)
    assert opt.device_budget_bytes < state_bytes / 5  # the state does not fit: pages had to move
    assert 0 < opt.peak_resident_bytes <= opt.device_budget_bytes
    assert opt.resident_bytes <= opt.device_budget_bytes


def test_paged_adamw_state_dict_round_trip():
    ref, _ = train(adamw)
    out, _ = train(paged, resume_at=9)  # fresh optimizer from the state dict after step 10
    assert all(torch.equal(a, b) for a, b in zip(ref, out))


def test_paged_adamw_state_dict_is_adamw_format():
    _, ref_opt = train(adamw, steps=6)
    _, opt = train(paged, steps=6)
    ours, theirs = opt.state_dict(), ref_opt.state_dict()
    hyper = [[{k: g[k] for k in KW} for g in sd["param_groups"]] for sd in (ours, theirs)]
    assert hyper[0] == hyper[1]
    assert ours["state"].keys() == theirs["state"].keys()
    for i, s in theirs["state"].items():
        assert torch.equal(ours["state"][i]["step"], s["step"])
        assert torch.equal(ours["state"][i]["exp_avg"], s["exp_avg"])
        assert torch.equal(ours["state"][i]["exp_avg_sq"], s["exp_avg_sq"])
    # either optimizer resumes from the other's state dict as if uninterrupted
    ref, _ = train(adamw)
    for first, then in ((paged, adamw), (adamw, paged)):
        out, _ = train(first, resume_at=9, resume_with=then)
        assert all(torch.equal(a, b) for a, b in zip(ref, out))


def test_paged_adamw_defaults_just_work():
    """PagedAdamW(params, lr=...) alone: 1 MiB pages, the automatic budget (unlimited on
    a CPU), so the state stays resident whole; the update is torch's AdamW with weight_decay 0."""
    ref, _ = train(lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.0, foreach=False), steps=3)
    out, opt = train(lambda ps: PagedAdamW(ps, lr=1e-4), steps=3)
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    assert opt.peak_resident_bytes == sum(2 * p.numel() * p.element_size() for p in out) <= opt.device_budget_bytes


def test_paged_adamw_rejects_budget_below_two_pages():
    with pytest.raises(ValueError):
        PagedAdamW([nn.Parameter(torch.zeros(10))], page_bytes=1024, device_budget_bytes=1024)


GiB = 1 << 30


@pytest.mark.parametrize("free,total,budget", [(70 * GiB, 80 * GiB, 62 * GiB), (6 * GiB, 8 * GiB, 5 * GiB),
                                                (GiB // 2, 80 * GiB, 2 << 20)])
def test_device_budget_leaves_a_margin_and_asks_cuda_only_for_a_gpu(monkeypatch, free, total, budget):
    """On a GPU: what is free there (made-up numbers here) less 10% of the device or
    1 GiB, whichever is larger, and at least two pages; on a CPU it is unlimited, and
    CUDA is never asked."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    assert nf4.device_budget(torch.device("cuda:0"), 1 << 20) == budget
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("CUDA asked"))
    assert nf4.device_budget(torch.device("cpu"), 1 << 20) == math.inf


def test_paged_adamw_default_budget_is_automatic(monkeypatch):
    """No budget given: none is fixed before the first step; on a CPU it is then unlimited,
    and each page is its own device copy (a copy would double the state's memory)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("CUDA asked"))
    p = nn.Parameter(torch.randn(1000))
    opt = PagedAdamW([p], lr=1e-3, page_bytes=1024)
    assert opt.device_budget_bytes is None
    p.grad = torch.randn(1000)
    opt.step()
    assert opt.device_budget_bytes == math.inf and len(opt.resident) == 8  # 2 moments x 4 pages
    assert all(dev is home for home, dev in opt.resident.values())


def test_paged_adamw_pins_pages_only_for_cuda_params(monkeypatch):
    """Pinning host memory starts a CUDA context on GPU 0: a --device cpu run on a machine
    with a GPU must not pin, whatever torch.cuda.is_available() says."""
    pins, zeros = [], torch.zeros
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "zeros", lambda *a, pin_memory=False, **k: (
        pins.append(pin_memory) or zeros(*a, **k)))  # asked for, not done: this machine may have no GPU
    _, opt = train(paged, steps=3, resume_at=1)  # pages made at the first step and by load_state_dict
    assert pins and not any(pins)
    opt._home(SimpleNamespace(shape=(300,), dtype=torch.float32, device=torch.device("cuda")))  # a GPU's
    assert pins[-1] is True


def test_paged_adamw_page_copies_do_not_block(monkeypatch):
    """Pages go to the device and back with non_blocking=True: on a GPU a blocking copy
    would stall the host at every page (flush waits for them before the host reads)."""
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(500, generator=g)) for _ in range(3)]
    opt = paged(params)
    for p in params:
        p.grad = torch.randn(500, generator=g)
    opt.step()  # pages are made here: host-to-host copies, blocking is fine
    calls, to, copy_ = [], torch.Tensor.to, torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: (
        calls.append(k.get("non_blocking")) or to(t, *a, **k)))
    monkeypatch.setattr(torch.Tensor, "copy_", lambda t, src, non_blocking=False: (
        calls.append(non_blocking) or copy_(t, src, non_blocking)))
    opt.step()
    assert calls and all(calls)  # pages moved (the state does not fit the budget), none blocking


# -----------------------------------------------------------------------------
# dequantize_nf4 (a byte's two values looked up at once) against dequantize_blockwise


@pytest.mark.parametrize("case", CASES)
def test_dequantize_nf4_equals_the_plain_lookup_bit_for_bit(case):
    """dequantize_blockwise of the unpacked codes: every bitsandbytes-made case, with and
    without double quantization. (Named apart from the exercises: graded by neither.)"""
    for double_quant in (False, True):
        q = quantize_nf4(REF[f"{case}.w"], blocksize=64, double_quant=double_quant)
        scales = q.absmax if not double_quant else nf4.dequantize_blockwise(
            q.absmax, q.nested_absmax, dynamic_table(), nf4.DQ_BLOCKSIZE) + q.nested_offset
        n = REF[f"{case}.w"].numel()
        plain = nf4.dequantize_blockwise(unpack_nibbles(q.packed, n), scales, nf4_table(), 64)
        out = dequantize_nf4(q)
        assert out.dtype == q.dtype, (case, double_quant)
        assert torch.equal(out, plain.view(q.shape).to(q.dtype)), (case, double_quant)


@pytest.mark.parametrize("shape,blocksize", [((40, 96), 64), ((7, 64), 128), ((3, 5), 64), ((1, 130), 64)])
def test_dequantize_nf4_handles_ragged_blocks(shape, blocksize):
    """A last block shorter than the others, or an odd number of weights."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    plain = nf4.dequantize_blockwise(unpack_nibbles(q.packed, w.numel()), q.absmax, nf4_table(), blocksize)
    assert torch.equal(dequantize_nf4(q), plain.view(shape))
