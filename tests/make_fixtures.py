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
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

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


if __name__ == "__main__":
    names = sys.argv[1:] or list(AREAS)
    for n in names:
        print(f"== {n}")
        AREAS[n]()
