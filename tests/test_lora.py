"""lora.py against PEFT and open-instruct (golden files from tests/make_fixtures.py),
plus the LoRA invariants a student can check by hand."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import llama
import lora
import nf4
from llama import TuluError, load_model

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "lora")
GQA = os.path.join(os.path.dirname(__file__), "fixtures", "llama", "gqa")
PEFT_ADAPTER, TULU_ADAPTER = os.path.join(FIX, "peft_adapter"), os.path.join(FIX, "tulu_adapter")


@pytest.fixture(scope="module")
def ref():
    return load_file(os.path.join(FIX, "expected.safetensors"))


@pytest.fixture(scope="module")
def meta():
    with open(os.path.join(FIX, "meta.json")) as f:
        return json.load(f)


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def with_adapter(path=PEFT_ADAPTER, dtype=torch.float32, quantize=None):
    model = load_model(GQA, dtype=dtype, quantize=quantize)
    lora.load_adapter(model, path)
    return model


def random_B(model, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


# -----------------------------------------------------------------------------
# Against the references


def test_load_adapter_written_by_peft_gives_peft_logits(ref):
    model = with_adapter()
    torch.testing.assert_close(logits(model, ref["input_ids"]), ref["peft_logits"], atol=1e-4, rtol=0)


def test_merge_lora_gives_peft_merge_and_unload_logits(ref, tmp_path):
    """After merging, the logits are PEFT's merge_and_unload logits, and so are
    those of the saved folder (make_fixtures checked transformers reads such a
    folder with these logits)."""
    model = lora.merge_lora(with_adapter())
    assert not lora.lora_layers(model)
    torch.testing.assert_close(logits(model, ref["input_ids"]), ref["merged_logits"], atol=1e-4, rtol=0)
    llama.save_model(model, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    torch.testing.assert_close(logits(load_model(tmp_path, dtype=torch.float32), ref["input_ids"]),
                               ref["merged_logits"], atol=1e-4, rtol=0)


def test_save_adapter_writes_files_peft_reads(ref, tmp_path):
    """make_fixtures checked that PEFT loads tulu_adapter/ (written by our
    save_adapter) with our logits; here: we read it to the same logits, and
    save_adapter still writes exactly those files."""
    model = with_adapter(TULU_ADAPTER)
    torch.testing.assert_close(logits(model, ref["input_ids"]), ref["tulu_adapter_peft_logits"], atol=1e-4, rtol=0)
    lora.save_adapter(model, tmp_path, base_model_name_or_path="tests/fixtures/llama/gqa")
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(TULU_ADAPTER))
    a, b = load_file(tmp_path / lora.ADAPTER_WEIGHTS), load_file(os.path.join(TULU_ADAPTER, lora.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in a
    with open(tmp_path / lora.ADAPTER_CONFIG) as x, open(os.path.join(TULU_ADAPTER, lora.ADAPTER_CONFIG)) as y:
        assert json.load(x) == json.load(y)


def peft_draws(model, seed, r):
    """The A matrices PEFT draws after manual_seed(seed), restated: for each target
    layer in module order it creates lora_A = Linear(in, r) and lora_B = Linear(r, out)
    (each drawing nn.Linear's default init), then re-draws A with kaiming_uniform_
    (a=sqrt(5)) and zeroes B. The draws are this machine's: torch.rand's bits on
    CPU depend on its vector instructions, for PEFT as for us."""
    torch.manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in lora.TARGETS:
            a, _ = torch.nn.Linear(m.in_features, r, bias=False), torch.nn.Linear(r, m.out_features, bias=False)
            torch.nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            out[name] = a.weight.detach()
    return out


def test_add_lora_initialises_A_as_peft(meta):
    """add_lora draws PEFT's A for the same seed: the same random calls in the same
    order (peft_draws). tulu_adapter/ holds the A add_lora drew on the machine that
    made the fixtures, which make_fixtures checked equals PEFT's A there; where this
    machine's generator gives the same bits (peft_draws reproduces the fixture),
    add_lora must give those bits too."""
    model = load_model(GQA, dtype=torch.float32)
    want = peft_draws(load_model(GQA, dtype=torch.float32), meta["seed"], meta["r"])
    torch.manual_seed(meta["seed"])
    lora.add_lora(model, r=meta["r"], alpha=meta["lora_alpha"], dropout=meta["lora_dropout"])
    layers = lora.lora_layers(model)
    assert list(layers) == list(want)
    for name, m in layers.items():
        assert torch.equal(m.lora_A.weight, want[name]), name
        assert not m.lora_B.weight.any()
    saved = load_file(os.path.join(TULU_ADAPTER, lora.ADAPTER_WEIGHTS))
    fixture = {name: saved[f"{lora.PEFT_PREFIX}{name}.lora_A.weight"] for name in want}
    if all(torch.equal(fixture[n], w) for n, w in want.items()):
        return
    # another CPU draws other bits: still uniform on [-1/sqrt(in), 1/sqrt(in)] (kaiming_uniform, a=sqrt(5))
    for name, w in want.items():
        bound = 1 / math.sqrt(w.shape[1])
        assert w.abs().max() <= bound and w.std() > bound / 2.5, name


@pytest.mark.parametrize("quantize,counts", [(None, "peft_counts"), ("nf4", "peft_counts_nf4")])
def test_add_lora_counts_parameters_as_peft(meta, capsys, quantize, counts):
    model = load_model(GQA, dtype=torch.float32, quantize=quantize)
    trainable, total = lora.add_lora(model, r=meta["r"], alpha=meta["lora_alpha"])
    assert [trainable, total] == meta[counts]
    assert f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: " in capsys.readouterr().out
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())


@pytest.mark.parametrize("dtype,tag", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_merge_lora_qlora_matches_open_instruct(ref, dtype, tag):
    """open-instruct's merge_lora.py --qlora (reproduced in make_fixtures with
    transformers, bitsandbytes and PEFT): quantize the base to NF4 with double
    quantization, dequantize it to `dtype`, add PEFT's delta. fp32 to 1e-5.

    bf16: the delta B A is a float32 matrix product, whose last bits depend on the
    BLAS's order of summation (MKL_CBWR=COMPATIBLE, another CPU); the sum W + delta
    is then rounded to bf16 once, so a sum near a rounding boundary can land one bf16
    step away. make_fixtures found every bit equal on its machine; anywhere, each
    weight is at most one bf16 step (at its magnitude) from the reference, and the
    rounding itself is exact: the merged weight is W + our delta rounded once."""
    model = lora.merge_lora(with_adapter(dtype=dtype, quantize="nf4"), dtype=dtype)
    unmerged = with_adapter(dtype=dtype, quantize="nf4")
    for key, want in ref.items():
        if key.startswith(f"qlora_{tag}."):
            name = key.split(".", 1)[1]
            got = model.get_submodule(name).weight
            assert got.dtype == dtype
            if tag == "fp32":
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
                continue
            layer = unmerged.get_submodule(name)
            exact = (layer.base_layer.dequantize(dtype).float() + lora.lora_delta(layer)).to(dtype)
            assert torch.equal(got, exact), name
            step = 2.0 ** (torch.frexp(want.float()).exponent - 8).clamp(min=-133)
            assert ((got.float() - want.float()).abs() <= step).all(), name


# -----------------------------------------------------------------------------
# Invariants


def test_lora_forward_fresh_adapter_changes_nothing():
    """B = 0 at initialisation, so (alpha/r) * B A x = 0, in eval and in train mode."""
    model = load_model(GQA, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    base = logits(model, ids)
    lora.add_lora(model, r=4, alpha=8)
    assert torch.equal(logits(model, ids), base)
    assert torch.equal(logits(model.train(), ids), base)  # dropout only touches the (zero) LoRA path


def test_lora_forward_formula_and_dtypes():
    """y = base(x) + (alpha/r) * B(A(x)) with A and B in float32 on a bf16 base: the
    LoRA path runs in float32; over nn.Linear the sum is rounded once to bf16 (PEFT's
    lora.Linear), over NF4 the scaled term is rounded to bf16 and added in bf16
    (PEFT's lora.bnb.Linear4bit), bit for bit."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 24, bias=True).to(torch.bfloat16)
    x = torch.randn(64, 16).bfloat16()
    for base in (lin, nf4.Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)):
        layer = lora.LoRALinear(base, r=4, alpha=8).eval()
        torch.nn.init.normal_(layer.lora_B.weight)
        A, B = layer.lora_A.weight, layer.lora_B.weight
        assert A.dtype == B.dtype == torch.float32
        with torch.no_grad():
            h = F.linear(F.linear(x.float(), A), B) * (8 / 4)
            want = (base(x) + h).bfloat16() if base is lin else base(x) + h.bfloat16()
            assert torch.equal(layer(x), want)
            assert base is lin or not torch.equal(want, (base(x) + h).bfloat16())  # the two orders differ here


def test_lora_linear_draws_its_init_on_the_cpu_whatever_the_device(monkeypatch):
    """PEFT draws A on the CPU and then moves it, so a seed gives its A on a GPU too.
    A base on the 'meta' device stands in for the GPU: every draw is made on the CPU,
    the same draws as over a CPU base (the generator ends in the same state), and A
    and B end up on the base's device."""
    bases = {device: nn.Linear(16, 8, device=device) for device in ("cpu", "meta")}
    drawn_on, kaiming = [], nn.init.kaiming_uniform_
    monkeypatch.setattr(nn.init, "kaiming_uniform_", lambda t, *a, **k: (
        drawn_on.append(t.device.type) or kaiming(t, *a, **k)))
    after = {}
    for device, base in bases.items():
        torch.manual_seed(0)
        layer = lora.LoRALinear(base, r=4, alpha=8)
        after[device] = torch.get_rng_state()
        assert layer.lora_A.weight.device.type == layer.lora_B.weight.device.type == device
    assert set(drawn_on) == {"cpu"} and torch.equal(after["cpu"], after["meta"])


def test_lora_linear_keeps_hf_state_dict_keys():
    model = load_model(GQA, dtype=torch.float32)
    keys = set(model.state_dict())
    lora.add_lora(model, r=4)
    sd = model.state_dict()
    assert {k for k in sd if ".lora_" not in k} == keys
    assert "model.layers.1.mlp.down_proj.lora_B.weight" in sd
    model.load_state_dict(sd, strict=True)


def test_merge_lora_equals_W_plus_scaled_BA():
    """W' = W + (alpha/r) B A, checked against a sum of r outer products."""
    model = with_adapter()
    layer = model.model.layers[1].mlp.down_proj
    W, A, B = layer.base_layer.weight.clone(), layer.lora_A.weight, layer.lora_B.weight
    want = W + layer.alpha / layer.r * sum(torch.outer(B[:, k], A[k]) for k in range(layer.r))
    lora.merge_lora(model)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, want, atol=1e-6, rtol=0)
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear  # generation's fast path takes it


def test_merge_lora_idempotent():
    model = lora.merge_lora(with_adapter(quantize="nf4"))
    once = {k: v.clone() for k, v in model.state_dict().items()}
    lora.merge_lora(model)
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items()) and once.keys() == model.state_dict().keys()
    assert all(type(m).__name__ not in ("LoRALinear", "Linear4bit") for m in model.modules())


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_add_lora_base_weight_unchanged_after_optimizer_step(quantize):
    """Only A and B move; on an NF4 base, gradients flow through the 4-bit weight to A."""
    model = load_model(GQA, dtype=torch.float32, quantize=quantize)
    lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    random_B(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in frozen.items())
    assert all(not torch.equal(sd[k], v) for k, v in adapters.items())


def test_adapters_disabled_gives_base_logits(ref):
    base = logits(load_model(GQA, dtype=torch.float32), ref["input_ids"])
    model = with_adapter()
    with lora.adapters_disabled(model):
        assert torch.equal(logits(model, ref["input_ids"]), base)
    torch.testing.assert_close(logits(model, ref["input_ids"]), ref["peft_logits"], atol=1e-4, rtol=0)


def test_load_adapter_key_variants_and_frozen(ref, tmp_path):
    """Some PEFT versions' files carry the adapter name (q_proj.lora_A.default.weight)
    and bf16 weights; either way the adapter loads, frozen unless trainable=True."""
    shutil.copy(os.path.join(PEFT_ADAPTER, lora.ADAPTER_CONFIG), tmp_path)
    sd = load_file(os.path.join(PEFT_ADAPTER, lora.ADAPTER_WEIGHTS))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in sd.items()}, tmp_path / lora.ADAPTER_WEIGHTS)
    model = with_adapter(tmp_path)
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model, ref["input_ids"]), ref["peft_logits"], atol=1e-4, rtol=0)
    model = load_model(GQA, dtype=torch.float32)
    lora.load_adapter(model, PEFT_ADAPTER, trainable=True)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


# -----------------------------------------------------------------------------
# adapter_model.bin, as PEFT wrote adapters before safetensors (the released Tulu 2
# QLoRA ones): read with torch.load(weights_only=True), which never runs a pickle's code

PEFT_BIN = os.path.join(os.path.dirname(__file__), "fixtures", "peft_bin")


def test_load_adapter_bin_gives_peft_logits():
    """An adapter PEFT saved with safe_serialization=False (make_fixtures: peft_bin) gives
    PEFT's logits; its tensors are exactly those of the pickle, as plain torch.load reads them."""
    ref = load_file(os.path.join(PEFT_BIN, "expected.safetensors"))
    model = with_adapter(os.path.join(PEFT_BIN, "adapter"))
    torch.testing.assert_close(logits(model, ref["input_ids"]), ref["peft_logits"], atol=1e-4, rtol=0)
    path, weights = lora.read_adapter_weights(os.path.join(PEFT_BIN, "adapter"))
    plain = torch.load(path, weights_only=False)  # the fixture is ours: trusted here, never in lora.py
    got = {f"{lora.PEFT_PREFIX}{layer}.{ab}.weight": t for layer, ts in weights.items() for ab, t in ts.items()}
    assert path.endswith("adapter_model.bin") and got.keys() == plain.keys()
    assert all(torch.equal(got[k], plain[k]) for k in plain)


class Trap:
    """Unpickled, it creates a folder: code that a pickle runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def booby_trapped_adapter(folder, marker):
    """A PEFT adapter folder whose adapter_model.bin would run os.mkdir(marker) when unpickled."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(PEFT_BIN, "adapter", lora.ADAPTER_CONFIG), folder)
    tensors = torch.load(os.path.join(PEFT_BIN, "adapter", lora.ADAPTER_BIN), weights_only=True)
    torch.save({**tensors, "trap": Trap(str(marker))}, os.path.join(folder, lora.ADAPTER_BIN))
    return str(folder)


def test_booby_trapped_bin_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "the_trap_ran"
    adapter = booby_trapped_adapter(tmp_path / "adapter", marker)
    torch.load(os.path.join(adapter, lora.ADAPTER_BIN), weights_only=False)  # the trap is armed: plain unpickling
    assert marker.is_dir()
    marker.rmdir()
    with pytest.raises(TuluError, match=rf"^{adapter}/adapter_model.bin: refused: its pickle would call \S*mkdir"):
        lora.load_adapter(load_model(GQA, dtype=torch.float32), adapter)
    assert not marker.exists()


def test_bin_without_a_tensor_dict_is_refused(tmp_path):
    shutil.copy(os.path.join(PEFT_BIN, "adapter", lora.ADAPTER_CONFIG), tmp_path)
    torch.save([torch.zeros(2)], tmp_path / lora.ADAPTER_BIN)
    with pytest.raises(TuluError, match="adapter_model.bin: holds no {name: tensor} dictionary"):
        lora.load_adapter(load_model(GQA, dtype=torch.float32), tmp_path)


# -----------------------------------------------------------------------------
# Errors: one line, naming the file


def edited_adapter(tmp_path, config=None, tensors=None):
    with open(os.path.join(PEFT_ADAPTER, lora.ADAPTER_CONFIG)) as f:
        cfg = {**json.load(f), **(config or {})}
    with open(tmp_path / lora.ADAPTER_CONFIG, "w") as f:
        json.dump(cfg, f)
    sd = load_file(os.path.join(PEFT_ADAPTER, lora.ADAPTER_WEIGHTS))
    save_file(tensors(sd) if tensors else sd, tmp_path / lora.ADAPTER_WEIGHTS)
    return tmp_path


def test_load_adapter_wrong_base():
    """The adapter was trained on gqa (2 key/value heads: k_proj is 32 x 64);
    llama2_sharded has 4 (64 x 64)."""
    model = load_model(os.path.join(GQA, "..", "llama2_sharded"), dtype=torch.float32)
    with pytest.raises(TuluError, match=r"adapter_model.safetensors: .*k_proj.*different base model"):
        lora.load_adapter(model, PEFT_ADAPTER)


def test_load_adapter_rank_mismatch(tmp_path):
    model = load_model(GQA, dtype=torch.float32)
    lora.add_lora(model, r=4)
    with pytest.raises(TuluError, match="rank mismatch.*r=4"):
        lora.load_adapter(model, PEFT_ADAPTER)
    with pytest.raises(TuluError, match="rank mismatch"):
        lora.load_adapter(load_model(GQA, dtype=torch.float32), edited_adapter(tmp_path, {"r": 4}))


def test_load_adapter_missing_files(tmp_path):
    model = load_model(GQA, dtype=torch.float32)
    with pytest.raises(TuluError, match="no such adapter folder"):
        lora.load_adapter(model, tmp_path / "nope")
    with pytest.raises(TuluError, match="adapter_config.json: not found"):
        lora.load_adapter(model, tmp_path)
    shutil.copy(os.path.join(PEFT_ADAPTER, lora.ADAPTER_CONFIG), tmp_path)
    with pytest.raises(TuluError, match="adapter_model.safetensors: not found"):
        lora.load_adapter(model, tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"")  # older PEFT wrote pickles: read when there is no safetensors
    with pytest.raises(TuluError, match="adapter_model.bin: not a readable PyTorch file"):
        lora.load_adapter(model, tmp_path)


@pytest.mark.parametrize("config,message", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"use_rslora": True}, "use_rslora=True is not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
])
def test_load_adapter_unsupported_config(tmp_path, config, message):
    model = load_model(GQA, dtype=torch.float32)
    with pytest.raises(TuluError, match=f"adapter_config.json: {message}"):
        lora.load_adapter(model, edited_adapter(tmp_path, config))


def test_load_adapter_bad_files(tmp_path):
    model = load_model(GQA, dtype=torch.float32)
    d = edited_adapter(tmp_path, tensors=lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(TuluError, match="no weights for model.layers.1.mlp.up_proj"):
        lora.load_adapter(model, d)
    d = edited_adapter(tmp_path, tensors=lambda sd: {**sd, "base_model.model.lm_head.weight": torch.zeros(256, 64)})
    with pytest.raises(TuluError, match="lm_head.weight is not a LoRA weight"):
        lora.load_adapter(model, d)
    (tmp_path / lora.ADAPTER_CONFIG).write_text('{\n  "r": 8,\n  oops\n}')
    with pytest.raises(TuluError, match=r"adapter_config.json: not a PEFT adapter config \(.*line 3"):
        lora.load_adapter(model, tmp_path)


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    """QLoRA's gradient checkpointing recomputes each decoder layer in backward
    (dropout included: the RNG state is replayed): the LoRA gradients are those
    of a plain backward, and every layer went through the checkpoint."""
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for on in (False, True):
        model = load_model(GQA, dtype=torch.float32, quantize="nf4")
        torch.manual_seed(0)  # the same A (initialised at random) in both models
        lora.add_lora(model, r=4, alpha=8, dropout=0.1)
        random_B(model)
        model.train()
        model.gradient_checkpointing = on
        torch.manual_seed(1)  # the same dropout masks
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(calls) == len(model.model.layers)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_lora_linear_drops_out_with_plain_nn_dropout():
    """The chapter's layer uses nn.Dropout itself (tulu swaps in machinery/fast.py's for
    training); p = 0 is no dropout module at all, as PEFT's nn.Identity."""
    assert type(lora.LoRALinear(nn.Linear(4, 4), 2, 4, dropout=0.1).dropout) is nn.Dropout
    assert isinstance(lora.LoRALinear(nn.Linear(4, 4), 2, 4, dropout=0.0).dropout, nn.Identity)
