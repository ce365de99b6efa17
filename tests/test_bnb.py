"""bitsandbytes 4-bit folders in and out, without bitsandbytes: load_model reads them (nf4.py's
last section), `tulu.py quantize` writes them (machinery/quantize.py), and the commands run on them.

Golden files come from tests/make_fixtures.py (area "bnb"): tests/fixtures/cli/hf_tiny loaded by
transformers with load_in_4bit (NF4, with and without double quantization) and saved; the logits
transformers computes (float32) from each folder, and PEFT's with the cli area's qlora adapter.
While the references were at hand, make_fixtures also checked that transformers reads what our
`quantize` writes with those logits, and PEFT an adapter our `sft` trained on a 4-bit folder.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama
import lora
import nf4
import tulu

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "bnb")
FOLDERS = {"double_quant": os.path.join(FIX, "tiny-bnb-4bit"),
           "no_double_quant": os.path.join(FIX, "tiny-bnb-4bit-no-dq")}
CLI = os.path.join(HERE, "fixtures", "cli")
HF_TINY = os.path.join(CLI, "hf_tiny")  # the base both folders were quantized from (bf16)
QLORA_ADAPTER = os.path.join(CLI, "sft_qlora")
COPIED = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@pytest.fixture(scope="module")
def ref():
    return load_file(os.path.join(FIX, "expected.safetensors"))


def logits(path, ids, dtype=torch.float32, quantize=None, adapter=None):
    model = llama.load_model(path, dtype=dtype, quantize=quantize)
    if adapter:
        lora.load_adapter(model, adapter)
    with torch.no_grad():
        return model(ids)


def linear4bits(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nf4.Linear4bit)}


def same_bytes(a, b):
    with open(a, "rb") as f, open(b, "rb") as g:
        return f.read() == g.read()


# -----------------------------------------------------------------------------
# Reading: the bytes bitsandbytes wrote, not quantized again


@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "no_double_quant"])
def test_load_bnb_folder_holds_the_bytes_of_quantizing_its_base(double_quant):
    """Every decoder weight is a Linear4bit holding quantize_nf4 of the base's weight (the
    bytes bitsandbytes wrote, bnb_tensors' inverse), with or without double quantization."""
    base = llama.load_model(HF_TINY)
    layers = linear4bits(llama.load_model(FOLDERS["double_quant" if double_quant else "no_double_quant"]))
    assert len(layers) == 2 * 7
    for name, layer in layers.items():
        want = nf4.quantize_nf4(base.get_submodule(name).weight, double_quant=double_quant)
        got = layer.quant_state()
        for field in ("packed", "absmax", "nested_absmax", "nested_offset"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None and b is None) or torch.equal(a, b), (name, field)


def test_load_bnb_folder_equals_quantizing_its_base_while_loading(ref):
    """QLoRA's base either way: load_model of the 4-bit folder and load_model(base, quantize="nf4")
    give the same logits, 0.0 apart, in bf16 and in float32."""
    ids = ref["input_ids"]
    for dtype in (torch.bfloat16, torch.float32):
        got = logits(FOLDERS["double_quant"], ids, dtype)
        assert torch.equal(got, logits(HF_TINY, ids, dtype, quantize="nf4")), dtype
        again = logits(FOLDERS["double_quant"], ids, dtype, quantize="nf4")  # not quantized twice
        assert torch.equal(got, again), dtype


@pytest.mark.parametrize("name", FOLDERS)
def test_load_bnb_folder_gives_transformers_logits(ref, name):
    """transformers + bitsandbytes on the folder (float32 compute), and PEFT with an adapter."""
    got = logits(FOLDERS[name], ref["input_ids"])
    assert torch.allclose(got, ref[f"{os.path.basename(FOLDERS[name])}.logits"], atol=1e-5, rtol=0)
    if name == "double_quant":
        got = logits(FOLDERS[name], ref["input_ids"], adapter=QLORA_ADAPTER)
        assert torch.allclose(got, ref["qlora.peft"], atol=1e-5, rtol=0)


def test_load_bnb_weight_parts_in_two_shards(tmp_path, ref):
    """transformers cuts shards by size: a 4-bit weight's parts may fall on both sides."""
    tensors = load_file(os.path.join(FOLDERS["double_quant"], "model.safetensors"))
    cut = "model.layers.0.mlp.up_proj.weight.absmax"  # on the far side of its weight
    second = {k for k in tensors if k.startswith("model.layers.1.") or k == cut}
    shards = {"model-00001-of-00002.safetensors": {k: t for k, t in tensors.items() if k not in second},
              "model-00002-of-00002.safetensors": {k: tensors[k] for k in second}}
    for name, part in shards.items():
        save_file(part, tmp_path / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copyfile(os.path.join(FOLDERS["double_quant"], "config.json"), tmp_path / "config.json")
    assert torch.equal(logits(tmp_path, ref["input_ids"]), logits(FOLDERS["double_quant"], ref["input_ids"]))


def bnb_copy(tmp_path, edit=None, drop=None):
    """The double-quantized folder, its quantization_config edited or a tensor left out."""
    d = tmp_path / "bnb"
    shutil.copytree(FOLDERS["double_quant"], d)
    with open(d / "config.json") as f:
        cfg = json.load(f)
    (edit or (lambda c: None))(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    if drop:
        tensors = load_file(d / "model.safetensors")
        save_file({k: t for k, t in tensors.items() if k != drop}, d / "model.safetensors")
    return d


@pytest.mark.parametrize("field,value", [("bnb_4bit_quant_type", "fp4"), ("load_in_8bit", True),
                                         ("load_in_4bit", False), ("quant_method", "gptq"),
                                         ("bnb_4bit_quant_storage", "bfloat16")])
def test_load_unsupported_quantization_config_is_a_one_line_error(tmp_path, field, value):
    d = bnb_copy(tmp_path, lambda c: c.update({field: value}))
    with pytest.raises(llama.TuluError) as e:
        llama.load_model(d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(d / "config.json")), msg
    assert f"{field} {value!r}" in msg, msg


@pytest.mark.parametrize("part", [".nested_absmax", ""], ids=["a_part", "the_codes"])
def test_load_bnb_weight_without_a_part_is_an_error(tmp_path, part):
    d = bnb_copy(tmp_path, drop="model.layers.0.mlp.up_proj.weight" + part)
    with pytest.raises(llama.TuluError, match=r"^\S*bnb: .*model.layers.0.mlp.up_proj.weight"):
        llama.load_model(d)


# -----------------------------------------------------------------------------
# Writing: `tulu.py quantize`, the same file as transformers + bitsandbytes


def test_quantize_writes_the_bitsandbytes_folder_byte_for_byte(tmp_path):
    out = tmp_path / "q"
    tulu.main(["quantize", "--model", HF_TINY, "--output", str(out)])
    assert same_bytes(out / "model.safetensors", os.path.join(FOLDERS["double_quant"], "model.safetensors"))
    with open(out / "config.json") as f, open(os.path.join(FOLDERS["double_quant"], "config.json")) as g:
        assert json.load(f)["quantization_config"] == json.load(g)["quantization_config"]
    assert all(same_bytes(out / n, os.path.join(HF_TINY, n)) for n in COPIED)


def test_quantize_streams_in_slices_the_same_bytes(tmp_path, monkeypatch):
    """A weight read in many slices (as a big one is) is written with the same bytes."""
    monkeypatch.setattr(nf4, "SLICE", 256)
    out = tmp_path / "q"
    tulu.main(["quantize", "--model", HF_TINY, "--output", str(out)])
    assert same_bytes(out / "model.safetensors", os.path.join(FOLDERS["double_quant"], "model.safetensors"))


def test_quantize_keeps_a_sharded_checkpoint_sharded(tmp_path):
    """Each file gives a file; load_model reads the folder as quantizing while loading does (float32 base)."""
    base = os.path.join(HERE, "fixtures", "llama", "llama2_sharded")
    out = tmp_path / "q"
    tulu.main(["quantize", "--model", base, "--output", str(out)])
    names = lambda d: [os.path.basename(f) for f in llama.checkpoint_files(d)]
    assert len(names(base)) > 1 and names(out) == names(base)
    ids = torch.randint(3, 256, (2, 9))
    assert torch.equal(logits(out, ids), logits(base, ids, quantize="nf4"))


# -----------------------------------------------------------------------------
# The commands on a 4-bit folder, as a new user runs them


def test_sft_on_a_bnb_folder_then_chat_and_merge(tmp_path, capsys):
    """sft trains on the 4-bit folder the adapter it trains on its base (the cli fixture's run);
    chat --adapter answers; merge --qlora dequantizes the folder as it does a base it quantized."""
    with open(os.path.join(CLI, "meta.json")) as f:
        meta = json.load(f)
    data = tmp_path / "sft.jsonl"
    with open(os.path.join(HERE, "..", "data", "sft_train.jsonl")) as f:
        data.write_text("".join(next(f) for _ in range(meta["data_lines"])))
    out, merged = tmp_path / "sft", tmp_path / "merged"
    tulu.main(["sft", "--model", FOLDERS["double_quant"], "--data", str(data), "--method", "qlora",
               "--output", str(out), *meta["sft_flags"]])
    got, want = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (out, QLORA_ADAPTER))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-4, rtol=0) for k in got)
    capsys.readouterr()
    tulu.main(["chat", "--model", FOLDERS["double_quant"], "--adapter", str(out), "--prompt", "Hi",
               "--max-new-tokens", "4"])
    assert capsys.readouterr().out.startswith("<|assistant|>\n")
    tulu.main(["merge", "--model", FOLDERS["double_quant"], "--adapter", QLORA_ADAPTER, "--qlora",
               "--output", str(merged), "--dtype", "fp32"])
    assert "quantization_config" not in (merged / "config.json").read_text()
    ids = load_file(os.path.join(CLI, "expected.safetensors"))["input_ids"]
    base_merged = logits(HF_TINY, ids, quantize="nf4", adapter=QLORA_ADAPTER)
    assert torch.allclose(logits(merged, ids), base_merged, atol=1e-5, rtol=0)


def test_full_fine_tuning_of_a_bnb_folder_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello"}]}) + "\n")
    with pytest.raises(SystemExit):
        tulu.main(["sft", "--model", FOLDERS["double_quant"], "--data", str(data), "--method", "full",
                   "--output", str(tmp_path / "out"), "--batch-size", "1", "--max-steps", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tulu sft: error")]
    assert len(err) == 1 and "4-bit" in err[0] and "--method full" in err[0], err


def test_quantize_of_a_bnb_folder_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tulu.main(["quantize", "--model", FOLDERS["double_quant"], "--output", str(tmp_path / "q")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "already 4-bit" in err[0] and not os.path.exists(tmp_path / "q"), err
