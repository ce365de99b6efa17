"""llama.py against transformers (golden files from tests/make_fixtures.py),
plus the invariants a student can check by hand."""
import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import llama
from llama import LlamaConfig, TuluError, load_model, save_model

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "llama")
MODELS = ["llama2_sharded", "gqa", "llama31", "tied"]


def expected(name):
    return load_file(os.path.join(FIX, f"{name}_expected.safetensors"))


@pytest.mark.parametrize("name", MODELS)
def test_load_model_logits_match_transformers(name):
    ref = expected(name)
    model = load_model(os.path.join(FIX, name), dtype=torch.float32)
    with torch.no_grad():
        logits = model(ref["input_ids"])
        masked = model(ref["input_ids"], attention_mask=ref["attention_mask"])
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)
    keep = ref["attention_mask"].bool()  # padded positions' logits are meaningless
    torch.testing.assert_close(masked[keep], ref["logits_masked"][keep], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_generate_greedy_matches_transformers(name):
    ref = expected(name)
    model = load_model(os.path.join(FIX, name), dtype=torch.float32)
    prompt = ref["input_ids"][0, :5].tolist()
    new = llama.generate(model, prompt, max_new_tokens=24)
    assert prompt + new == ref["greedy"].tolist()


def test_generate_kv_cache_equals_full_recompute():
    model = load_model(os.path.join(FIX, "gqa"), dtype=torch.float32)
    ids = expected("gqa")["input_ids"][:1, :12]
    cache = [llama.KVCache(12) for _ in model.model.layers]
    with torch.no_grad():
        full = model(ids)
        a = model(ids[:, :7], cache=cache)
        b = model(ids[:, 7:], cache=cache, start_pos=7)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=0)


def test_kv_cache_token_by_token_equals_full_recompute_and_writes_in_place():
    """Decoding one token at a time: the buffers, made at the first step with room
    for all 12 positions, are never reallocated."""
    model = load_model(os.path.join(FIX, "gqa"), dtype=torch.float32)
    ids = expected("gqa")["input_ids"][:1, :12]
    cache, steps, buffers = [llama.KVCache(12) for _ in model.model.layers], [], set()
    with torch.no_grad():
        full = model(ids)
        steps.append(model(ids[:, :3], cache=cache))
        for t in range(3, 12):
            steps.append(model(ids[:, t:t + 1], cache=cache, start_pos=t))
            buffers.add(cache[0].k.data_ptr())
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache[0].len == 12 and cache[0].k.shape[2] == 12 and len(buffers) == 1


def test_last_only_is_the_last_positions_logits():
    model = load_model(os.path.join(FIX, "gqa"), dtype=torch.float32)
    ids = expected("gqa")["input_ids"][:, :10]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:], atol=1e-5, rtol=0)


def test_llama31_config_reads_rope_scaling():
    cfg = LlamaConfig.from_json(os.path.join(FIX, "llama31", "config.json"))
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 32
    # Llama-3.1-8B's values: the highest frequencies are kept, the lowest divided
    # by `factor`, and those between move monotonically from one to the other
    real = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                       rope_scaling={**cfg.rope_scaling, "original_max_position_embeddings": 8192})
    plain = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0)
    ratio = llama.rope_inv_freq(real) / llama.rope_inv_freq(plain)
    assert ratio[0] == 1 and torch.isclose(ratio[-1], torch.tensor(1 / 8))
    assert (ratio[1:] <= ratio[:-1]).all()


def test_save_model_loads_in_transformers(tmp_path):
    """tests/make_fixtures.py checked that transformers loads saved_by_tulu/ (our
    save_model output) with our logits; here we check save_model still writes
    those same files, and that they reload to transformers' logits."""
    model = load_model(os.path.join(FIX, "gqa"), dtype=torch.float32)
    save_model(model, tmp_path, max_shard_bytes=60_000)
    golden = os.path.join(FIX, "saved_by_tulu")
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(golden))
    for f in os.listdir(golden):
        if f.endswith(".safetensors"):
            a, b = load_file(os.path.join(tmp_path, f)), load_file(os.path.join(golden, f))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            with open(os.path.join(tmp_path, f)) as x, open(os.path.join(golden, f)) as y:
                assert json.load(x) == json.load(y), f
    ref = expected("saved_by_tulu")
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path), dtype=torch.float32)(ref["input_ids"]),
                                   ref["logits"], atol=1e-4, rtol=0)


def test_save_model_tied_round_trip(tmp_path):
    model = load_model(os.path.join(FIX, "tied"), dtype=torch.float32)
    save_model(model, tmp_path)
    assert "lm_head.weight" not in load_file(os.path.join(tmp_path, "model.safetensors"))
    again = load_model(str(tmp_path), dtype=torch.float32)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    ids = expected("tied")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_state_dict_keys_are_hf_keys():
    model = load_model(os.path.join(FIX, "llama2_sharded"), dtype=torch.float32)
    with open(os.path.join(FIX, "llama2_sharded", "model.safetensors.index.json")) as f:
        hf_keys = set(json.load(f)["weight_map"])
    assert set(model.state_dict()) == hf_keys


def test_load_model_bf16_matches_transformers_bf16():
    """Loaded and computed in bf16, as checkpoints ship: transformers' bf16 logits.

    The tolerance, in units of one bf16 step at the largest logit (2^-8 * max|logit|,
    bf16 keeping 8 significant bits): another CPU's kernels add the products of a
    matmul in another order, so a value near a rounding boundary can round one step
    the other way, and the few such flips carry through two layers. Measured against
    this fixture: 0 units with oneDNN limited to AVX2 (the machine that made it), 1.8
    with AVX-512, 2.5 with ATen's scalar kernels. Computing in fp32 instead (a model
    that ignores dtype) is 5.3 units away, so 4 units tells the two apart."""
    ref = expected("gqa_bf16")
    model = load_model(os.path.join(FIX, "gqa"), dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(ref["input_ids"])
    assert logits.dtype == torch.bfloat16
    step = 2**-8 * ref["logits"].float().abs().max()
    torch.testing.assert_close(logits.float(), ref["logits"].float(), atol=4 * step, rtol=0)


def test_rms_norm_formula():
    x, w = torch.randn(3, 5, 16), torch.randn(16)
    naive = torch.stack([w * v / torch.sqrt((v * v).mean() + 1e-6) for v in x.view(-1, 16)]).view(3, 5, 16)
    torch.testing.assert_close(llama.rms_norm(x, w, 1e-6), naive)


def test_apply_rope_is_a_rotation_and_relative():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4)
    inv = llama.rope_inv_freq(cfg)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def rot(x, p):
        cos, sin = llama.rope_cos_sin(inv, torch.tensor([p]), torch.float32)
        return llama.apply_rope(x, cos, sin)
    torch.testing.assert_close(rot(q, 9).norm(), q.norm())
    # the attention score depends only on the distance between positions (RoFormer Sec. 3.4.2)
    torch.testing.assert_close((rot(q, 7) * rot(k, 3)).sum(), (rot(q, 14) * rot(k, 10)).sum(), atol=1e-5, rtol=0)


def test_gqa_attention_matches_naive_loop():
    """Every query head h of every row b and query t, one at a time:
    softmax over the allowed keys s of q.k_s / sqrt(Dh), then the weighted sum of the v_s,
    with k and v taken from key/value head h // (H / Hkv). Padding hides the last key of row 1."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, S, Dh = 2, 6, 2, 3, 5, 8
    q, k, v = (torch.randn(B, h, n, Dh, generator=g) for h, n in ((H, T), (Hkv, S), (Hkv, S)))
    mask = llama.attention_mask_4d(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]), T, S, "cpu")
    out = llama.gqa_attention(q, k, v, mask)
    assert out.shape == (B, H, T, Dh)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for t in range(T):
                allowed = [s for s in range(S) if mask[b, 0, t, s]]
                scores = torch.stack([q[b, h, t] @ k[b, kv, s] / Dh ** 0.5 for s in allowed])
                want = sum(w * v[b, kv, s] for w, s in zip(scores.softmax(0), allowed))
                torch.testing.assert_close(out[b, h, t], want, atol=1e-5, rtol=1e-5)


def test_attention_mask_4d_causal_and_padding():
    # left padding: the pad key is hidden; the pad query, which could see nothing, sees all
    m = llama.attention_mask_4d(torch.tensor([[0, 1, 1]]), 3, 3, "cpu")[0, 0]
    assert m.tolist() == [[True, True, True], [False, True, False], [False, True, True]]
    # with a cache: 2 new queries at positions 3 and 4 of 5
    m = llama.attention_mask_4d(None, 2, 5, "cpu")[0, 0]
    assert m.tolist() == [[True] * 4 + [False], [True] * 5]
    # no padding, or padding on the right only: plain causal attention (None) is the same thing
    assert llama.attention_mask_4d(None, 3, 3, "cpu") is None
    assert llama.attention_mask_4d(torch.tensor([[1, 1, 0], [1, 1, 1]]), 3, 3, "cpu") is None


def test_attention_mask_4d_none_equals_the_explicit_causal_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(llama.gqa_attention(q, k, v, None), llama.gqa_attention(q, k, v, causal))


def sampled_frequencies(n=4000, **kw):
    """How often each of 4 tokens is drawn in n calls, from a seeded generator."""
    logits, g = torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([int(llama.sample_next(logits, generator=g, **kw)) for _ in range(n)]),
                            minlength=4)
    return counts.double() / n


@pytest.mark.parametrize("kw,probs", [
    # softmax([0, 1, 2, 3] / 2)
    (dict(temperature=2.0), torch.softmax(torch.tensor([0.0, 1.0, 2.0, 3.0]) / 2, -1)),
    # top_k=2 keeps tokens 2 and 3, renormalised: e^2, e^3 over their sum
    (dict(temperature=1.0, top_k=2), torch.tensor([0, 0, 1 / (1 + math.e), math.e / (1 + math.e)])),
    # probabilities .032 .087 .237 .644: top_p=0.7 keeps the two largest
    (dict(temperature=1.0, top_p=0.7), torch.tensor([0, 0, 1 / (1 + math.e), math.e / (1 + math.e)])),
])
def test_sample_next_draws_from_the_warped_distribution(kw, probs):
    """Frequencies over 4000 seeded draws within 5 standard errors (sqrt(p(1-p)/n) <= 0.008)
    of the probabilities left after temperature, top-k and top-p: a sampler that
    always takes the most likely token, or ignores a warper, is far outside."""
    freq = sampled_frequencies(**kw)
    assert ((freq - probs.double()).abs() <= 5 * (probs.double() * (1 - probs.double()) / 4000).sqrt() + 1e-9).all(), freq


def test_sample_next_greedy_at_temperature_zero():
    assert int(llama.sample_next(torch.tensor([[0.0, 1.0, 3.0, 2.0]]))) == 2


def test_pickle_only_folder_is_a_clear_error(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(TuluError, match="safetensors"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_broken_checkpoint_files_are_clear_errors(tmp_path, quantize):
    """What an interrupted download leaves: a missing shard, a truncated shard;
    and a config.json that is not an object. Each names the file."""
    src = os.path.join(FIX, "llama2_sharded")
    for name in ("missing", "truncated", "config"):
        d = tmp_path / name
        shutil.copytree(src, d)
        shard = sorted(f for f in os.listdir(d) if f.startswith("model-"))[-1]
        if name == "missing":
            os.remove(d / shard)
        elif name == "truncated":
            (d / shard).write_bytes((d / shard).read_bytes()[:1000])
        else:
            (d / "config.json").write_text("[1, 2]")
        bad = str(d / ("config.json" if name == "config" else shard))
        with pytest.raises(TuluError, match=re.escape(bad)):
            load_model(str(d), dtype=torch.float32, quantize=quantize)


def test_unsupported_config_names_the_file(tmp_path):
    cfg = json.load(open(os.path.join(FIX, "gqa", "config.json")))
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(TuluError, match=str(p)):
        LlamaConfig.from_json(str(p))
    p.write_text(json.dumps({**cfg, "rope_scaling": None, "hidden_act": "gelu"}))
    with pytest.raises(TuluError, match="hidden_act"):
        LlamaConfig.from_json(str(p))


def test_tokenizer_json_only_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TuluError, match="tokenizer.json"):
        llama.Tokenizer(str(tmp_path))


# -----------------------------------------------------------------------------
# label_logps: the labels' log-probabilities without the whole logits


def head_and_rows(dtype, trained, V=50, D=16, seed=0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(D, V, bias=False).to(dtype).requires_grad_(trained)
    h = torch.randn(3, 7, D, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (3, 7))
    labels[0, :4] = -100   # a prompt
    labels[2, 1:] = -100   # a row with nothing to learn
    return head, h, labels


@pytest.mark.parametrize("rows", [1, 2, 5, None])
@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_logps_equals_the_plain_path_and_its_gradients(dtype, trained, rows):
    """Values and gradients (of h, and of the head when it is trained) as log_softmax over
    the whole logits gives them, whatever the chunk of rows; each position weighted
    differently (as DPO's per-answer gradients weight them)."""
    head, h, labels = head_and_rows(dtype, trained)
    weights = torch.randn(3, 6)
    ref = llama.reference_label_logps(head(h), labels)
    (ref * weights).sum().backward()
    want = [h.grad] + ([head.weight.grad] if trained else [])
    h.grad, head.weight.grad = None, None
    got = llama.label_logps(h, head, labels, rows=rows)
    (got * weights).sum().backward()
    # float32: rounding only; bf16: the gradient is rounded to bf16 at another point (2**-8 relative)
    # (a chunk's product may round a bf16 logit differently from the whole one: 2**-6 at |z| ~ 4)
    fp32 = dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5 if fp32 else 0.02, rtol=1e-5 if fp32 else 0)
    assert (got[labels[:, 1:] == -100] == 0).all()
    tol = dict(atol=1e-6, rtol=1e-5) if fp32 else dict(atol=0.02 * want[0].abs().max().item(), rtol=0.02)
    for g, w in zip([h.grad] + ([head.weight.grad] if trained else []), want):
        torch.testing.assert_close(g, w, **tol)


def test_chunk_rows_by_device():
    """16 MiB of float32 logits on a CPU, 256 MiB on a GPU (any of them), the CPU's
    size for other devices, and one row at least."""
    assert llama.chunk_rows("cpu", 32000) == 2**22 // 32000 == 131
    assert llama.chunk_rows("cuda", 32000) == 2**26 // 32000 == 2097
    assert llama.chunk_rows(torch.device("cuda:1"), 32000) == 2097
    assert llama.chunk_rows("cuda", 128256) == 523 and llama.chunk_rows("meta", 128256) == 32
    assert llama.chunk_rows("cpu", 2**23) == 1


def test_label_logps_chunks_by_chunk_rows(monkeypatch):
    """Without `rows`, label_logps asks chunk_rows for h's device and the head's vocabulary."""
    head, h, labels = head_and_rows(torch.float32, False)
    asked, rows, apply = [], [], llama.LabelLogps.apply
    monkeypatch.setattr(llama, "chunk_rows", lambda device, vocab: asked.append((device, vocab)) or 3,
                        raising=False)
    monkeypatch.setattr(llama.LabelLogps, "apply", lambda *a: rows.append(a[3]) or apply(*a))
    llama.label_logps(h, head, labels)
    assert asked == [(h.device, 50)] and rows == [3]


def test_label_logps_with_nothing_learned_is_zero_with_zero_gradient():
    head, h, labels = head_and_rows(torch.float32, True)
    labels[:] = -100
    got = llama.label_logps(h, head, labels)
    got.sum().backward()
    assert torch.equal(got, torch.zeros(3, 6)) and not h.grad.any() and not head.weight.grad.any()


def test_label_logps_keeps_no_logits_for_backward():
    """With the head frozen (LoRA) backward needs (N, D) per learned row, not (B, T, V)."""
    head, h, labels = head_and_rows(torch.float32, False, V=500)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        llama.label_logps(h, head, labels, rows=2)
    assert max(sizes) <= h.numel()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        llama.reference_label_logps(head(h), labels)
    assert max(sizes) >= 3 * 6 * 500  # the plain path keeps the logits' size


def test_label_logps_under_autocast_computes_in_its_dtype():
    """A float32 head under bf16 autocast: the logits are rounded to bf16 as F.linear's are."""
    head, h, labels = head_and_rows(torch.float32, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = llama.reference_label_logps(head(h), labels)
        got = llama.label_logps(h, head, labels, rows=2)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_model_labels_give_transformers_log_probs(name):
    """model(ids, attention_mask, labels=...) against log_softmax of transformers' own
    logits (the fixture) at the learned positions: padding and prompt are -100."""
    ref = expected(name)
    model = load_model(os.path.join(FIX, name), dtype=torch.float32)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    with torch.no_grad():
        got = model(ids, attention_mask=mask, labels=labels)
    want = llama.reference_label_logps(ref["logits_masked"], labels)
    assert got.shape == want.shape and (labels[:, 1:] != -100).sum() > 4
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
