"""Chapter 1: the Llama model, loaded from real Hugging Face checkpoints.

A decoder-only transformer as Llama 2 (arXiv 2307.09288) and Llama 3 build it:
RMSNorm (1910.07467), rotary position embeddings (RoFormer, 2104.09864) with Llama
3.1's frequency scaling, grouped-query attention (GQA, 2305.13245), the SwiGLU MLP;
with the parameter names of `transformers`' LlamaForCausalLM, so a downloaded
checkpoint loads by copying and HF's "rotate half" RoPE needs no permutation. Then
generation with a key/value cache, and last the tokenizers, token for token with
HF's: Llama 2's sentencepiece and Llama 3's byte-level BPE (1508.07909), in plain Python.

Shapes: B batch, T time (tokens), D hidden size, H query heads, Hkv key/value
heads, Dh head size, V vocabulary.  Read top to bottom.
"""
import json
import math
import os
import re
import unicodedata
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from functools import lru_cache
from itertools import chain
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


class TuluError(Exception):
    """A problem with the user's input (path, config, data): the command line
    prints it as one line and exits non-zero, without a traceback."""


def read_json(path: str, what: str) -> dict:
    """The JSON object in `path`; anything else is a one-line TuluError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as e:  # not JSON (the message names the line and column), or not UTF-8
        raise TuluError(f"{path}: not {what} ({e})") from None
    if not isinstance(obj, dict):
        raise TuluError(f"{path}: not {what}")
    return obj


# -----------------------------------------------------------------------------
# Configuration: the fields of Hugging Face's config.json


@dataclass
class LlamaConfig:
    """Defaults are Llama-2-7b's (its config.json on the Hugging Face hub)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    head_dim: int | None = None             # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None        # Llama 3.1: {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    extra: dict = field(default_factory=dict, repr=False)  # other keys, written back by save_model

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str) -> "LlamaConfig":
        d = read_json(path, "a JSON model config")
        rp = dict(d.pop("rope_parameters", None) or {})  # where transformers >= 5 writes theta and scaling
        d.setdefault("rope_theta", rp.pop("rope_theta", cls.rope_theta))
        if rp.get("rope_type", "default") != "default":
            d.setdefault("rope_scaling", rp)
        names = {f.name for f in fields(cls)} - {"extra"}
        cfg = cls(**{k: d[k] for k in d if k in names}, extra={k: d[k] for k in d if k not in names})
        mt, rs = cfg.extra.get("model_type", "llama"), cfg.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type"))
        if mt != "llama":
            raise TuluError(f"{path}: model_type {mt!r} is not supported (only 'llama')")
        if cfg.hidden_act != "silu":
            raise TuluError(f"{path}: hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        if rs and kind not in ("llama3", "default"):
            raise TuluError(f"{path}: rope_scaling type {kind!r} is not supported (only 'llama3')")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise TuluError(f"{path}: num_attention_heads must be a multiple of num_key_value_heads")
        return cfg

    def to_dict(self) -> dict:
        d = {**self.extra, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}}
        return {**d, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}


# -----------------------------------------------------------------------------
# Building blocks


def rms_norm(x, weight, eps):
    """y = weight * x / sqrt(mean(x^2) + eps), the mean over the last dim (RMSNorm,
    arXiv 1910.07467, Eq. 4). Computed in float32 and cast back to x's dtype before
    the scale, in that order, because that is what HF does and bf16 results depend on it."""
    # exercise: rms_norm
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)
    # end exercise


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """theta_i = base^(-2i/Dh) for i < Dh/2 (RoFormer Eq. 15), then, for Llama 3.1
    (rope_type "llama3"), long wavelengths are slowed down by `factor`, short ones
    kept, and the band in between interpolated smoothly. Returns (Dh/2,) float32 on the CPU."""
    two_i = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu")  # as HF, even under `meta`
    inv_freq = 1.0 / (cfg.rope_theta ** (two_i.float() / cfg.head_dim))
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) != "llama3":
        return inv_freq
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq, positions, dtype):
    """cos/sin tables for integer positions (T,) -> two (T, Dh) tensors."""
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # (T, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, Dh): HF pairs dim i with dim i + Dh/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+Dh/2}) by the angle position * theta_i (RoFormer
    Eq. 34, with HF's pairing of dim i with dim i + Dh/2 instead of 2i with 2i+1):

        out_i        = x_i cos - x_{i+Dh/2} sin
        out_{i+Dh/2} = x_{i+Dh/2} cos + x_i sin

    x: (B, H, T, Dh); cos, sin: (T, Dh), each angle twice (rope_cos_sin).
    Norms are preserved (a rotation)."""
    # exercise: apply_rope
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # HF's rotate_half: (x1, x2) -> (-x2, x1)
    return x * cos + rotated * sin
    # end exercise


def attention_mask_4d(attention_mask, T, S, device):
    """Boolean (B or 1, 1, T, S) mask, True = may attend: causal (query t sits at
    position S - T + t) and, if given, the (B, S) padding mask of 1/0. None where
    plain causal attention is the same (no cache; padding only on the right, where no
    real token sees it): SDPA's fused causal kernels (flash attention) then serve."""
    if T == S and (attention_mask is None or bool((attention_mask.cumprod(-1) == attention_mask).all())):
        return None
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    mask = (torch.arange(S, device=device)[None, :] <= q_pos)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
        mask = mask | ~mask.any(-1, keepdim=True)  # a pad query that sees nothing sees all (softmax finite)
    return mask


def gqa_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(Dh)) v for each query head over the keys `mask` allows (as
    attention_mask_4d makes it; None: causal). Query head h reads key/value head h // (H/Hkv)
    (GQA, arXiv 2305.13245 Sec. 2.2; Hkv = H is multi-head attention).
    q: (B, H, T, Dh); k, v: (B, Hkv, S, Dh) -> (B, H, T, Dh)."""
    # exercise: gqa_attention
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # (repeat_interleave copies even when groups is 1)
        k = k.repeat_interleave(groups, dim=1)  # (B, H, S, Dh)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    # end exercise


class KVCache:
    """One layer's keys and values of every position so far, for generation: a step
    computes k and v of its new tokens only and writes them into buffers made once,
    with room for `size` positions (torch.cat would copy all the earlier ones)."""

    def __init__(self, size: int):
        self.size, self.len, self.k, self.v = size, 0, None, None

    def update(self, k, v):  # (B, Hkv, T, Dh) each -> those of all positions so far
        if self.k is None:
            self.k, self.v = (t.new_empty(*t.shape[:2], self.size, t.shape[3]) for t in (k, v))
        n = self.len + k.shape[2]
        self.k[:, :, self.len:n], self.v[:, :, self.len:n], self.len = k, v, n
        return self.k[:, :, :n], self.v[:, :, :n]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.H, self.Hkv, self.Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(D, self.H * self.Dh, bias=b)
        self.k_proj = nn.Linear(D, self.Hkv * self.Dh, bias=b)
        self.v_proj = nn.Linear(D, self.Hkv * self.Dh, bias=b)
        self.o_proj = nn.Linear(self.H * self.Dh, D, bias=b)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.Dh).transpose(1, 2)    # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.Hkv, self.Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.Hkv, self.Dh).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: the earlier positions' keys and values, then these
            k, v = cache.update(k, v)  # (B, Hkv, S, Dh)
        y = gqa_attention(q, k, v, mask)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.Dh))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        D, I, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(D, I, bias=b), nn.Linear(D, I, bias=b)
        self.down_proj = nn.Linear(I, D, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn, self.mlp = Attention(cfg), MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)  # pre-norm residual
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# The labels' log-probabilities without the whole logits
#
# Training needs log softmax(h W^T)[label] only where a label is learned, not the (B, T, V)
# logits, a step's biggest tensors (V = 32,000 to 128,256), kept in float32 twice (the upcast
# and log_softmax's output). LabelLogps takes the learned rows alone, a chunk at a time;
# reference_label_logps is the plain version the tests hold it to.


def chunk_rows(device, vocab: int) -> int:
    """Rows of logits LabelLogps computes at once: 2**22 logits (16 MiB in float32) keep a chunk
    near a CPU's caches; 2**26 give each GPU kernel enough work to be worth its launch."""
    return max(1, (2**26 if torch.device(device).type == "cuda" else 2**22) // vocab)


def reference_label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) -> (B, T-1) float32: log softmax(logits[t-1])[labels[t]]
    (position t-1 predicts token t), 0 where labels[t] == -100."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = labels[:, 1:]
    return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)


class LabelLogps(torch.autograd.Function):
    """(N, D) hidden rows, the (V, D) head weight, (N,) targets -> (N,) float32
    log softmax(h W^T)[target], `rows` rows at a time. The gradient by the logits,
    onehot - softmax, is known in forward: kept (negated) times W, (N, D), if W is
    frozen (LoRA), else as (N, V) in the compute dtype (a fifth of the plain path's
    float32 logits and log-softmax). Under autocast the products run in its dtype."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows):
        dev = h.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        (N, D), V, w, frozen = h.shape, weight.shape[0], weight.to(cd), not ctx.needs_input_grad[1]
        out = torch.empty(N, dtype=torch.float32, device=h.device)
        kept = h.new_empty(N, D if frozen else V, dtype=cd) if any(ctx.needs_input_grad[:2]) else None
        with torch.autocast(dev, enabled=False):
            for s in range(0, N, rows):
                t = targets[s:s + rows]
                logp = torch.log_softmax((h[s:s + rows].to(cd) @ w.t()).float(), dim=-1)  # (n, V)
                out[s:s + rows] = logp.gather(1, t[:, None]).squeeze(1)
                if kept is not None:
                    p = logp.exp_()  # softmax
                    p[torch.arange(len(t), device=p.device), t] -= 1  # softmax - onehot, in float32
                    kept[s:s + rows] = p.to(cd) @ w if frozen else p  # (n, D), or (n, V)
        ctx.dtype, ctx.h_dtype = cd, h.dtype
        ctx.save_for_backward(kept, *(() if frozen else (h, weight)))
        return out

    @staticmethod
    def backward(ctx, g):
        kept, *hw = ctx.saved_tensors
        d = kept * -g[:, None].to(ctx.dtype)  # g x (onehot - softmax): per h (N, D), or per logit (N, V)
        if not hw:  # the head is frozen: d is already per h
            return d.to(ctx.h_dtype), None, None, None
        h, weight = hw
        grad_h = (d @ weight.to(ctx.dtype)).to(h.dtype) if ctx.needs_input_grad[0] else None
        return grad_h, (d.t() @ h.to(ctx.dtype)).to(weight.dtype), None, None


def label_logps(h: torch.Tensor, head: nn.Module, labels: torch.Tensor, rows: int | None = None):
    """reference_label_logps(head(h), labels) by LabelLogps on the learned positions
    only: h (B, T, D) final hidden states, head the lm_head, labels (B, T) -> (B, T-1).
    A head other than a bias-free nn.Linear (LoRA, 4-bit) takes the plain path."""
    if type(head) is not nn.Linear or head.bias is not None:
        return reference_label_logps(head(h), labels)
    labels = labels[:, 1:]
    learned = labels != -100  # (B, T-1)
    rows = rows or chunk_rows(h.device, head.out_features)
    logp = LabelLogps.apply(h[:, :-1][learned], head.weight, labels[learned], rows)  # (N,)
    return torch.zeros(labels.shape, dtype=torch.float32, device=h.device).index_put((learned,), logp)


# -----------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    """HF's LlamaForCausalLM: `model` holds the embeddings, the layers and the final
    norm (a ModuleDict, as nanoGPT's `transformer`, for HF's "model." key prefix)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.inv_freq = rope_inv_freq(cfg)  # float32; not a buffer, which model.to(bf16) would round

    def forward(self, input_ids, attention_mask=None, cache=None, start_pos=0, last_only=False, labels=None):
        """input_ids (B, T) -> logits (B, T, V). attention_mask (B, start_pos+T): 1 marks
        real tokens. cache (a KVCache per layer): keys and values of the first start_pos
        positions in generation. last_only: the last position's logits alone, (B, 1, V).
        labels (B, T): each label's log-probability given the tokens before it instead,
        (B, T-1) float32."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        positions = torch.arange(start_pos, start_pos + T, device=x.device)
        cos, sin = rope_cos_sin(self.inv_freq.to(x.device), positions, x.dtype)  # (T, Dh) each
        mask = attention_mask_4d(attention_mask, T, start_pos + T, x.device)
        for layer, c in zip(self.model.layers, cache or [None] * len(self.model.layers)):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recompute the layer's activations in backward instead of keeping them
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, c, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, c)
        x = self.model.norm(x[:, -1:] if last_only else x)
        return self.lm_head(x) if labels is None else label_logps(x, self.lm_head, labels)


def pad_batch(rows, pad_id) -> dict:
    """(input_ids, labels) pairs -> {"input_ids", "labels", "attention_mask"}, (N, T) long,
    right-padded: ids with pad_id (an existing token: no vocabulary resize), labels -100, mask 0."""

    shape = (len(rows), max(len(x) for x, _ in rows))  # (N, T)
    ids, labels, mask = (torch.full(shape, v, dtype=torch.long) for v in (pad_id, -100, 0))
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.as_tensor(x), torch.as_tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# -----------------------------------------------------------------------------
# Checkpoints: Hugging Face folders of safetensors files

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"


def atomic_write(path: str, write):
    """write(tmp), then rename tmp to path: an interrupt never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of an HF model folder, single or sharded."""
    index = os.path.join(path, SAFE_INDEX)
    if not os.path.isdir(path):
        raise TuluError(f"{path}: no such model folder")
    if os.path.exists(index):
        shards = sorted(set(read_json(index, "a safetensors index").get("weight_map", {}).values()))
        lost = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if lost:
            raise TuluError(f"{os.path.join(path, lost[0])}: listed in {SAFE_INDEX} but missing "
                            f"({len(lost)} of {len(shards)} shards; an incomplete download?)")
        return [os.path.join(path, s) for s in shards]
    if os.path.exists(os.path.join(path, SAFE_SINGLE)):
        return [os.path.join(path, SAFE_SINGLE)]
    if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(path)):
        raise TuluError(f"{path}: only pickle weights (pytorch_model.bin) found; tulu reads safetensors only "
                        "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise TuluError(f"{path}: no model.safetensors or {SAFE_INDEX} found")


def checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype of an HF folder's (first) weight: what a fine-tuned copy is written in."""
    from safetensors import safe_open
    with safe_open(checkpoint_files(path)[0], framework="pt") as f:
        keys = [k for k in f.keys() if not k.endswith("rotary_emb.inv_freq")]
        return f.get_slice(keys[0])[0:1].dtype if keys else torch.float32


def check_shape(key: str, got, want):
    if tuple(got) != tuple(want):
        raise TuluError(f"{key}: checkpoint shape {tuple(got)} != model shape {tuple(want)}")


def decoder_linear(key: str) -> bool:
    return key.startswith("model.layers.") and key.endswith("_proj.weight")


def read_checkpoint_file(model: Llama, fname: str, expected, dtype, device, quantize, four_bit=None):
    """Put the tensors of one safetensors file in place of the model's meta ones, yielding the
    key of each. A bitsandbytes 4-bit weight and its parts go to `four_bit` (nf4.load_bnb_linears)."""
    from safetensors import SafetensorError, safe_open
    if quantize or four_bit is not None:
        import nf4  # chapter 2, read only when asked for
    # Quantizing, read each tensor into memory of its own (pread): through mmap, the
    # pages of every weight read would stay mapped in our RSS until the file closes.
    backend = {"backend": "pread"} if quantize else {}
    try:
        with safe_open(fname, framework="pt", device="cpu", **backend) as f, \
                (nf4.SafetensorsSlices(fname) if quantize else nullcontext()) as raw:  # read in slices
            for key in (k for k in f.keys() if not k.endswith("rotary_emb.inv_freq")):  # old files' RoPE
                if four_bit is not None and key.endswith(nf4.BNB_PARTS):  # not a parameter
                    four_bit[key] = f.get_tensor(key).to(device)
                    continue
                if key not in expected:
                    raise TuluError(f"{fname}: unexpected tensor {key} (not a Llama checkpoint?)")
                if four_bit is not None and f.get_slice(key).get_dtype() == "U8":  # 4-bit codes
                    four_bit[key] = f.get_tensor(key).to(device)
                elif quantize and decoder_linear(key):
                    nf4.set_linear4bit(model, key, raw.read_nf4(key, dtype, device), dtype)
                else:
                    new = f.get_tensor(key).to(device=device, dtype=dtype)
                    check_shape(key, new.shape, model.get_parameter(key).shape)
                    module, _, name = key.rpartition(".")
                    setattr(model.get_submodule(module), name, nn.Parameter(new))
                yield key

    except SafetensorError as e:  # a truncated or corrupt file, e.g. an interrupted download
        raise TuluError(f"{fname}: not a valid safetensors file ({e})") from None


def load_model(path: str, dtype=torch.bfloat16, device="cpu", quantize=None) -> Llama:
    """Load an HF Llama folder: the model built on the `meta` device (no memory), then filled a
    tensor at a time (peak memory: the model plus one tensor). quantize="nf4": each decoder linear
    weight to 4-bit as it is read, a slice at a time (QLoRA; SafetensorsSlices.read_nf4), the rest in
    `dtype`, as bitsandbytes does. A bitsandbytes 4-bit folder (config.json's quantization_config)
    loads in 4-bit as it is."""
    files = checkpoint_files(path)
    cfg = LlamaConfig.from_json(os.path.join(path, "config.json"))
    if quantize not in (None, "nf4"):
        raise TuluError(f"quantize={quantize!r}: only None or 'nf4'")
    with torch.device("meta"):
        model = Llama(cfg)
    four_bit = {} if "quantization_config" in cfg.extra else None  # a bitsandbytes 4-bit folder
    if four_bit is not None:
        import nf4
        nf4.check_bnb_config(cfg.extra.pop("quantization_config"), os.path.join(path, "config.json"))
    expected = model.state_dict().keys()
    keys = (k for f in files
            for k in read_checkpoint_file(model, f, expected, dtype, device, quantize, four_bit))
    seen = set(tqdm(keys, total=len(expected), desc=f"loading {os.path.basename(os.path.normpath(path))}",
                    unit="tensor", leave=False, disable=len(expected) < 100))  # a real model, not a tiny one
    if four_bit is not None:
        nf4.load_bnb_linears(model, four_bit, dtype, path)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        seen.add("lm_head.weight")
    missing = [k for k in expected if k not in seen]
    if missing:
        raise TuluError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    return model.eval()


SAFE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.int64: "I64", torch.uint8: "U8"}


def write_safetensors(fname: str, tensors: dict, dtype=None, fetch=lambda t: t):
    """safetensors' format written a tensor at a time. The header (8 bytes of length, then
    JSON: each tensor's dtype, shape and offsets into the data) needs no values, so each
    tensor is fetched (FSDP: gathered whole), cast to `dtype`, written and freed in turn."""
    header, end = {"__metadata__": {"format": "pt"}}, 0
    for k, t in tensors.items():
        stored = dtype or t.dtype
        n = t.numel() * stored.itemsize
        header[k] = {"dtype": SAFE_NAMES[stored], "shape": list(t.shape), "data_offsets": [end, end + n]}
        end += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts at a multiple of 8 bytes
    with open(fname, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for t in tensors.values():
            data = fetch(t.detach()).to("cpu", dtype or t.dtype).contiguous()
            f.write(data.view(-1).view(torch.uint8).numpy())


def model_tensors(model: Llama) -> dict:
    """What save_model writes, in order: the state dict but a tied lm_head (as HF)."""
    sd = model.state_dict()
    return {k: v for k, v in sd.items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}


def save_model(model: Llama, out_dir: str, max_shard_bytes: int = 5 * 2**30, dtype=None, fetch=lambda t: t):
    """Write `model` as an HF folder: config.json, and model.safetensors or, past max_shard_bytes,
    shards model-0000k-of-0000n.safetensors and their index. The weights keep their dtype, or are
    cast to `dtype` (float32 master weights written as the bf16 checkpoint they came from)."""
    for name, m in model.named_modules():
        if type(m).__name__ in ("Linear4bit", "LoRALinear"):
            raise TuluError(f"save_model: {name} is a {type(m).__name__}; merge it first (lora.merge_lora)")
    os.makedirs(out_dir, exist_ok=True)
    sd = model_tensors(model)
    nbytes = {k: v.numel() * (dtype or v.dtype).itemsize for k, v in sd.items()}
    shards, size = [[]], 0
    for k in sd:
        if shards[-1] and size + nbytes[k] > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(k)
        size += nbytes[k]
    names = [SAFE_SINGLE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        tensors = {k: sd[k] for k in keys}
        atomic_write(os.path.join(out_dir, name), lambda tmp: write_safetensors(tmp, tensors, dtype, fetch))

    if len(shards) > 1:
        weight_map = {k: n for n, ks in zip(names, shards) for k in ks}
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        write_json(os.path.join(out_dir, SAFE_INDEX), index)
    elif os.path.exists(os.path.join(out_dir, SAFE_INDEX)):
        os.remove(os.path.join(out_dir, SAFE_INDEX))  # a stale index would point at old shards
    cfg, stored = model.config.to_dict(), dtype or model.model.embed_tokens.weight.dtype
    cfg["torch_dtype"] = cfg["dtype"] = str(stored).removeprefix("torch.")  # "bfloat16"
    write_json(os.path.join(out_dir, "config.json"), cfg)


# -----------------------------------------------------------------------------
# Generation with a key/value cache


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from (B, V) logits: argmax when temperature is 0,
    else sample after HF's warpers in HF's order: temperature, top-k, top-p."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p  # the least likely, whose mass stays under
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             eos_id=None, on_token=None, generator=None) -> list[int]:
    """Continue one prompt (list of ids, or a (T,) / (1, T) tensor). Returns the new
    tokens (an EOS that stops generation is included, as HF's generate does);
    `on_token(id)` is called for each one as it is produced, for streaming."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).view(1, -1)
    cache, out = [KVCache(ids.shape[1] + max_new_tokens) for _ in model.model.layers], []
    eos = set(eos_id) if isinstance(eos_id, (list, tuple, set)) else {eos_id} - {None}
    while len(out) < max_new_tokens and not (out and out[-1] in eos):
        logits = model(ids, cache=cache, start_pos=cache[0].len, last_only=True)[:, -1]  # (1, V)
        out.append(int(sample_next(logits, temperature, top_k, top_p, generator)[0]))
        if on_token:
            on_token(out[-1])
        ids = torch.tensor([[out[-1]]], device=device)
    return out


# -----------------------------------------------------------------------------
# Tokenizers, part 1: special tokens, and Llama 2's sentencepiece


def tokenizer_config(folder: str) -> dict:
    """tokenizer_config.json beside a tokenizer file, {} where there is none."""
    path = os.path.join(folder, "tokenizer_config.json")
    return read_json(path, "a JSON object") if os.path.exists(path) else {}


class SpecialSplitting:
    """What both tokenizers do alike: the special tokens written in a text become
    their ids (the chat format writes the EOS text after each answer) and each piece
    of text between them is encoded on its own, by the subclass's encode_piece."""

    def set_specials(self, specials: dict[str, int]):
        self.specials = specials  # {text: id}
        # one regex for all (it scans in C); where two start at one place the longer wins, as in HF
        alternatives = "|".join(map(re.escape, sorted(specials, key=len, reverse=True)))
        self.special = re.compile(f"({alternatives})") if specials else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`; bos=True puts in front what the tokenizer adds by default (Llama 2's
        <s>, Llama 3's <|begin_of_text|>, nothing for a GPT-2 style file); eos=True appends EOS."""
        ids = [i for _, _, span_ids, _ in self.spans(text) for i in span_ids]
        return (self.bos_ids if bos else []) + ids + [self.eos_id] * eos

    def spans(self, text: str):
        """Yield (start, end, ids, special?) for each special token of `text` and each piece
        of text between them, in order. A piece's ids depend on it alone and on whether it
        starts the text: how tulu finds where each turn of a chat ends."""
        start = 0
        for m in self.special.finditer(text) if self.special else ():
            if m.start() > start:
                yield start, m.start(), self.encode_piece(text[start:m.start()], start == 0), False
            yield m.start(), m.end(), [self.specials[m[0]]], True
            start = m.end()
        if start < len(text):
            yield start, len(text), self.encode_piece(text[start:], start == 0), False


class SentencePieceTokenizer(SpecialSplitting):
    """Llama 2's tokenizer.model, encoding as HF's slow LlamaTokenizer does, "<unk>",
    "<s>", "</s>" the special tokens. `legacy` (tokenizer_config.json's; False without
    it, as in transformers 5) is how HF treats text after one: True gives it
    sentencepiece's dummy prefix "▁" ("</s>", "▁", "\\n"), False does not ("</s>", "\\n")."""

    def __init__(self, model_file: str, legacy: bool | None = None):
        import sentencepiece as spm
        self.file, self.dir = model_file, os.path.dirname(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.bos_id, self.eos_id, unk = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.bos_ids, self.eos_text = [self.bos_id], self.sp.id_to_piece(self.eos_id)
        self.vocab_size, self.unk_text = self.sp.get_piece_size(), self.sp.id_to_piece(unk)
        self.set_specials({self.sp.id_to_piece(i): i for i in (unk, self.bos_id, self.eos_id) if i >= 0})
        self.legacy = bool(tokenizer_config(self.dir).get("legacy")) if legacy is None else legacy
        self._sp_no_prefix = None

    def sp_no_prefix(self):
        """The model as HF builds it for legacy=False, add_dummy_prefix off: these 4 bytes
        after the serialized ModelProto repeat field 3 (normalizer_spec) holding field 3
        (add_dummy_prefix) = 0, which protobuf merges into the first one."""
        if self._sp_no_prefix is None:
            import sentencepiece as spm
            with open(self.file, "rb") as f:
                self._sp_no_prefix = spm.SentencePieceProcessor(model_proto=f.read() + b"\x1a\x02\x18\x00")
            self.unk_len = len(self._sp_no_prefix.encode(self.unk_text))
        return self._sp_no_prefix

    def encode_piece(self, piece: str, first: bool) -> list[int]:
        """Ids of text without special tokens; `first`: it begins the text. legacy=True:
        each piece gets the dummy prefix "▁"; legacy=False: only the text's start, and a
        later piece that starts with a space keeps it as "▁" (HF encodes "<unk>" + piece
        and drops the ids of "<unk>")."""
        if self.legacy:
            return self.sp.encode(piece)
        sp, piece = self.sp_no_prefix(), "▁" * first + piece.replace("▁", " ")
        if piece.startswith(("▁", " ")):
            return sp.encode(self.unk_text + piece)[self.unk_len:]
        return sp.encode(piece)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


# -----------------------------------------------------------------------------
# Tokenizers, part 2: byte-level BPE from tokenizer.json (Llama 3, SmolLM2, GPT-2)
#
# Byte-pair encoding (Sennrich et al. 2016, arXiv 1508.07909) on bytes, as GPT-2
# does (Radford et al. 2019, Sec. 2.2): a regex cuts the text into words, a word's
# UTF-8 bytes are spelled with 256 printable stand-ins, and the merges learned in
# training join adjacent symbols, the earliest-learned pair first.


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 bytes: those that print as themselves
    ('!'..'~', '¡'..'¬', '®'..'ÿ') keep their code point, the 68 others take U+0100,
    U+0101, ... in byte order (a space is "Ġ", a newline "Ċ")."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(0x100 + i) for i, b in enumerate(others)}}


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply learned merges to one word's symbols: find the adjacent pair with the
    lowest rank (the merge learned first), join every occurrence of it from left
    to right, and repeat until no adjacent pair has a rank (BPE, arXiv 1508.07909,
    Sec. 3.2, run at encoding time). ["l", "o", "w"] with ranks {("l", "o"): 0,
    ("lo", "w"): 1} -> ["lo", "w"] -> ["low"]. The symbols always join back to the word."""
    # exercise: bpe_merge
    while len(symbols) > 1:
        pairs = list(zip(symbols, symbols[1:]))
        ranked = [ranks.get(p, math.inf) for p in pairs]
        best = min(ranked)
        if best == math.inf:
            break
        pair, out, i = pairs[ranked.index(best)], [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                out.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols
    # end exercise


# Python's `re` has no \p{L}: the files' (Oniguruma) classes are spelled out as
# code-point ranges, of Unicode general categories and of White_Space (Oniguruma's
# \s; Python's adds U+001C..U+001F).
CATEGORIES = ("Lu Ll Lt Lm Lo Mn Mc Me Nd Nl No Pc Pd Ps Pe Pi Pf Po Sm Sc Sk So Zs Zl Zp "
              "Cc Cf Cs Co Cn").split()
WHITE_SPACE = (*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
               0x202F, 0x205F, 0x3000)
ESCAPE = r"\\(?:([pP])\{(\w+)\}|([sS])|.)"  # \p{X}, \P{X}, \s, \S, or any other escape
CLASS = r"\[\^?\]?(?:\\.|[^\]\\])*\]"  # [...], where a "]" right after "[" or "[^" is literal


@lru_cache(maxsize=1)
def unicode_categories() -> bytes:
    """Each code point's general category as a byte (its index in CATEGORIES): 0.2 s, once."""
    index = {c: i for i, c in enumerate(CATEGORIES)}
    return bytes(index[unicodedata.category(chr(c))] for c in range(0x110000))


@lru_cache(maxsize=None)
def class_body(name: str, negate: bool = False, limit: int = 0x110000) -> str:
    r"""The inside of a class for \p{name} (a category: "L" = Lu|Ll|Lt|Lm|Lo, "N", "Lu",
    ...) or \s (name "s"), as ranges "\U00000041-\U0000005a..." of the code points
    below `limit`; with negate, of every other one."""
    if name == "s":
        mask = bytearray(0x110000)
        for c in WHITE_SPACE:
            mask[c] = 1
    else:
        wanted = [c.startswith(name) and len(name) <= 2 for c in CATEGORIES]
        if not any(wanted):
            raise ValueError(f"unknown Unicode property \\p{{{name}}}")
        mask = unicode_categories().translate(bytes(wanted) + bytes(256 - len(wanted)))
    runs = re.compile(b"\x00+" if negate else b"\x01+")
    return "".join(f"\\U{m.start():08x}-\\U{m.end() - 1:08x}" for m in runs.finditer(mask[:limit]))


def translate_regex(pattern: str, limit: int = 0x110000) -> str:
    """A tokenizer.json regex as a Python `re` pattern: \\p{X}, \\P{X}, \\s, \\S become
    class_body's ranges (inside [...], or a class of their own); the rest these files
    use -- (?i:...), lookahead, {1,3} -- means the same in both. limit=0x10000: the
    Basic Multilingual Plane only, the same on text without characters beyond it and
    7x faster (`re` tests such a class with one bitmap lookup, not range by range)."""
    def escape(m, in_class=False):
        if not (m[1] or m[3]):  # an escape that means the same in `re`
            return m[0]
        body = class_body(m[2] or "s", (m[1] or m[3]).isupper(), limit)
        return body if in_class else f"[{body}]"

    def part(m):  # a whole class, its escapes translated, or an escape outside one
        return re.sub(ESCAPE, lambda e: escape(e, True), m[0]) if m[0][0] == "[" else escape(m)
    return re.sub(f"{CLASS}|{ESCAPE}", part, pattern)


BEYOND_BMP = re.compile("[\U00010000-\U0010ffff]")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's


class WordCache(dict):
    """word -> ids, filled on first sight (a data set repeats its words, so most are
    looked up, not merged again); cleared when it grows past `limit`."""

    def __init__(self, encode_word, limit=1_000_000):
        super().__init__()
        self.encode_word, self.limit = encode_word, limit

    def __missing__(self, word):
        if len(self) >= self.limit:
            self.clear()
        ids = self[word] = self.encode_word(word)
        return ids


def sequence(step: dict | None, key: str) -> list:
    """The steps of a tokenizer.json Sequence (its `key` list), or [step] itself."""
    return step.get(key, [step]) if (step or {}).get("type") == "Sequence" else [step]


class BPETokenizer(SpecialSplitting):
    """A byte-level BPE tokenizer.json, encoding as HF `tokenizers` does: its added
    tokens are the special ones; the text between them is cut into words by the file's
    regex(es), a word's bytes spelled in byte_alphabet() and merged (bpe_merge; with
    `ignore_merges` a word in the vocabulary is one token); BOS (and EOS) as its
    TemplateProcessing adds them. What else a file asks for is a TuluError naming it."""

    def __init__(self, path: str):
        self.file, self.dir = path, os.path.dirname(path)
        spec = read_json(path, "a JSON tokenizer file")
        model = spec.get("model") or {}
        self.check(spec, model)
        self.vocab, self.ignore_merges = model["vocab"], bool(model.get("ignore_merges"))
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.set_specials({t["content"]: t["id"] for t in spec.get("added_tokens") or []})
        self.id_to_text = {i: t for t, i in [*self.vocab.items(), *self.specials.items()]}
        self.vocab_size = max(self.id_to_text) + 1
        self.split_patterns, self.prefix_space = self.read_pre_tokenizer(spec["pre_tokenizer"])
        self.bos_ids, eos_ids = self.read_template(spec.get("post_processor"))
        self.to_byte = {c: b for b, c in byte_alphabet().items()}
        self.byte_table = str.maketrans({chr(b): c for c, b in self.to_byte.items()})  # latin-1 -> stand-in
        self.cache = WordCache(self.encode_word)
        config = tokenizer_config(self.dir)  # bos_token, eos_token: a string, or {"content": ...}
        bos, eos = (t.get("content") if isinstance(t, dict) else t
                    for t in (config.get("bos_token"), config.get("eos_token")))
        self.bos_id = self.token_id(bos) if bos else (self.bos_ids[0] if self.bos_ids else None)
        self.eos_text = eos or (self.id_to_text[eos_ids[-1]] if eos_ids else None)
        self.eos_id = self.token_id(self.eos_text) if self.eos_text else None

    def unsupported(self, field, value, why="tulu reads byte-level BPE tokenizer.json: Llama 3, GPT-2 style"):
        raise TuluError(f"{self.file}: {field} {json.dumps(value)[:80]} is not supported ({why})")

    def check(self, spec, model):
        if model.get("type") != "BPE":
            self.unsupported("model.type", model.get("type"))
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            self.unsupported("decoder", spec.get("decoder"))
        model_keys = ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix")
        unused = {"normalizer": spec.get("normalizer"),  # each must be absent, null, false or ""
                  **{f"model.{k}": model.get(k) for k in model_keys},
                  **{f"added token {t['content']!r} {k}": t.get(k) for t in spec.get("added_tokens") or []
                     for k in ("lstrip", "rstrip", "single_word")}}
        for name, value in unused.items():
            if value:
                self.unsupported(name, value)

    def read_pre_tokenizer(self, pre):
        """([(BMP-only, full) compiled regexes, applied in turn], add a leading space?) from
        Split(regex, Isolated) or Digits steps then ByteLevel (Llama 3; SmolLM2 splits off
        each digit first), or ByteLevel alone, with GPT-2's regex if use_regex."""
        steps = sequence(pre, "pretokenizers")
        if (steps[-1] or {}).get("type") != "ByteLevel":
            self.unsupported("pre_tokenizer", pre, "a byte-level BPE ends its pre-tokenizer with ByteLevel")
        patterns = []
        for step in steps[:-1]:
            if step.get("type") == "Digits":  # numbers (Rust's char::is_numeric) alone, or runs of them
                patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
            elif step.get("type") != "Split" or step.get("behavior") != "Isolated" or step.get("invert"):
                why = "only Split with behavior Isolated, Digits and ByteLevel"
                self.unsupported("pre_tokenizer step", step, why)
            else:
                pattern = step.get("pattern", {})
                patterns.append(pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"]))
        patterns += [GPT2_SPLIT] if steps[-1].get("use_regex", True) else []
        compiled = [[re.compile(f"({translate_regex(p, limit)})") for limit in (0x10000, 0x110000)]
                    for p in patterns]
        if any(bmp.groups > 1 for bmp, _ in compiled):
            self.unsupported("pre_tokenizer", pre, "a regex with a capturing group")
        return compiled, bool(steps[-1].get("add_prefix_space"))

    def read_template(self, post):
        """[ids before the text, ids after it] of TemplateProcessing's "single"
        template, e.g. [[128000], []] for Llama 3: BOS added, no EOS."""
        ids, side = [[], []], 0
        for step in sequence(post, "processors"):
            step = step or {}
            if step.get("type") not in (None, "ByteLevel", "TemplateProcessing"):  # ByteLevel: offsets only
                self.unsupported("post_processor", step["type"], "only TemplateProcessing and ByteLevel")
            for item in step.get("single", []):  # a SpecialToken, or the text ("Sequence")

                side = side or "Sequence" in item
                if "SpecialToken" in item:
                    ids[side] += step["special_tokens"][item["SpecialToken"]["id"]]["ids"]
        return ids

    def token_id(self, text):
        if text not in self.specials and text not in self.vocab:
            raise TuluError(f"{self.file}: token {text!r} (from tokenizer_config.json) is not in the "
                            "vocabulary")
        return self.specials.get(text, self.vocab.get(text))

    def words(self, text: str) -> list[str]:
        """Cut text into words with each Split regex in turn, then GPT-2's; as HF's
        Split(Isolated) does, what a regex does not match stays, as words of its own."""
        words = [" " + text if self.prefix_space and not text.startswith(" ") else text]
        full = BEYOND_BMP.search(text) is not None
        for pattern in (pair[full] for pair in self.split_patterns):
            words = [part for w in words for part in pattern.split(w) if part]  # matches (a group), the rest
        return words

    def encode_word(self, word: str) -> list[int]:
        spelled = word.encode("utf-8").decode("latin-1").translate(self.byte_table)  # in byte_alphabet()
        if self.ignore_merges and spelled in self.vocab:
            return [self.vocab[spelled]]
        return [self.vocab[s] for s in bpe_merge(list(spelled), self.ranks)]

    def encode_piece(self, piece: str, first: bool = True) -> list[int]:
        """Ids of text without added tokens (`first` changes nothing here)."""
        return list(chain.from_iterable(map(self.cache.__getitem__, self.words(piece))))

    def decode(self, ids) -> str:
        """Each token's stand-ins back to bytes (a token with other characters, as an added one
        may have: its UTF-8), decoded at once as `tokenizers` does (half a character: U+FFFD)."""
        tokens = [self.id_to_text[int(i)] for i in ids]
        return b"".join(bytes(map(self.to_byte.get, t)) if all(c in self.to_byte for c in t) else t.encode()
                        for t in tokens).decode(errors="replace")


def Tokenizer(path: str, legacy: bool | None = None):
    """The tokenizer of a model folder or a tokenizer file: Llama 2's sentencepiece
    tokenizer.model, else a byte-level BPE tokenizer.json (Llama 3). HF's Llama 2
    folders ship both and read tokenizer.model; Llama 3's tokenizer.model is tiktoken's."""
    candidates = [os.path.join(path, n) for n in ("tokenizer.model", "tokenizer.json")] \
        if os.path.isdir(path) else [path]
    for file in filter(os.path.exists, candidates):
        if file.endswith(".json"):
            return BPETokenizer(file)
        try:
            return SentencePieceTokenizer(file, legacy)
        except (RuntimeError, OSError):
            if file == candidates[-1]:
                raise TuluError(f"{file}: not a sentencepiece model") from None
    raise TuluError(f"{path}: no tokenizer.model or tokenizer.json found" if os.path.isdir(path)
                    else f"{path}: no such tokenizer file")
