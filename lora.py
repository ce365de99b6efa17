"""Chapter 3: LoRA adapters that speak PEFT's file format, and merging them.

What this file teaches: low-rank adaptation (LoRA, Hu et al. 2021, arXiv 2106.09685). The
pretrained weight W (O, D) stays frozen; each adapted layer learns an update (alpha/r) * B A of
rank R << D, so a 7B model trains ~1% of its parameters. With QLoRA (arXiv 2305.14314) W is
chapter 2's 4-bit NF4 weight and only A and B, in float32, get gradients. Tulu 2 QLoRA 70B (arXiv
2311.10702) was released as such an adapter, to be merged into Llama 2 after dequantizing the
base. Our adapter files are PEFT's; merge_lora gives open-instruct's `merge_lora.py --qlora` weights.

Shapes: B batch, T time, D in features, O out features, R rank. Read top to bottom.
"""
from __future__ import annotations

import math
import os
import pickle
import re
from contextlib import contextmanager

import torch
import torch.nn as nn

from llama import TuluError, atomic_write, read_json, write_json, write_safetensors
from nf4 import Linear4bit

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"  # PEFT's weights before safetensors, a pickle (read_weights_only)
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the HF model: its keys gain this prefix

# -----------------------------------------------------------------------------
# The LoRA layer, and adding it to a model


def _hide_base_layer(module, state_dict, prefix, local_metadata):
    # q_proj.base_layer.weight -> q_proj.weight, so the base model keeps HF's keys
    for k in [k for k in state_dict if k.startswith(prefix + "base_layer.")]:
        state_dict[prefix + k[len(prefix + "base_layer."):]] = state_dict.pop(k)


def _find_base_layer(module, state_dict, prefix, *args):
    for k in [k for k in state_dict if k.startswith(prefix) and not k[len(prefix):].startswith("lora_")]:
        state_dict[prefix + "base_layer." + k[len(prefix):]] = state_dict.pop(k)  # and back, to load


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear or NF4 Linear4bit) plus a low-rank path:

        y = base(x) + (alpha / r) * B(A(dropout(x)))      (LoRA Eq. 3 and Sec. 4.1)

    A starts Kaiming-uniform (a=sqrt(5), as nn.Linear and PEFT), B at zero: a fresh adapter changes
    nothing. A and B stay float32; as PEFT, over nn.Linear the sum is taken in float32 and cast back,
    over a 4-bit base the LoRA term is first rounded to the compute dtype (PEFT scales before
    rounding, we after: the same when alpha / r is a power of two, as QLoRA's 16 / 64). state_dict
    keys: the base's (q_proj.weight), and PEFT's (q_proj.lora_A.weight, q_proj.lora_B.weight)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        device = (base.packed if isinstance(base, Linear4bit) else base.weight).device
        # created in PEFT's order (A, B, then A's init), so a seed gives PEFT's A; drawn on the
        # CPU, as PEFT draws, then moved: a GPU's generator would give other numbers
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device="cpu", dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device="cpu", dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(device), self.lora_B.to(device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False      # True: the layer is its base (adapters_disabled)
        self.train(base.training)  # a model in eval mode stays there (no dropout)
        self.register_state_dict_post_hook(_hide_base_layer)
        self.register_load_state_dict_pre_hook(_find_base_layer)

    def forward(self, x):
        """x: (B, T, D) -> y (B, T, O) in the class docstring's dtypes; a disabled layer is its base."""
        y = self.base_layer(x)
        if self.disabled:
            return y
        # exercise: lora_forward
        h = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        if isinstance(self.base_layer, Linear4bit):  # as PEFT over bitsandbytes: h rounded to y's dtype first
            return torch.add(y, h.to(y.dtype), alpha=self.scaling)
        return torch.add(y, h, alpha=self.scaling).to(y.dtype)  # y + scaling * h, in float32
        # end exercise


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, r: int = 64, alpha: float = 16, dropout: float = 0.1,
             targets=TARGETS) -> tuple[int, int]:
    """Wrap each linear layer whose name ends in one of `targets` in a LoRALinear, freeze the rest
    (defaults: Tulu 2 QLoRA's). Prints and returns (trainable, all) as PEFT's print_trainable_parameters:
    an NF4 weight counts O*D (PEFT doubles the packed bytes), its scales 0; a tied embedding once."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, Linear4bit)) and n.rpartition(".")[2] in targets]
    if not names:
        raise TuluError(f"add_lora: no linear layer is named like {list(targets)}")
    model.requires_grad_(False)
    for n in names:
        model.set_submodule(n, LoRALinear(model.get_submodule(n), r, alpha, dropout))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    nf4 = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    total = sum(p.numel() for p in model.parameters()) + nf4
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / total:.4f}")
    return trainable, total


# -----------------------------------------------------------------------------
# PEFT's adapter files


def adapter_tensors(model: nn.Module) -> dict:
    return {f"{PEFT_PREFIX}{n}.{ab}.weight": getattr(m, ab).weight for n, m in lora_layers(model).items()
            for ab in ("lora_A", "lora_B")}


def save_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str | None = None,
                 fetch=lambda t: t):
    """adapter_model.safetensors (keys base_model.model.<layer>.lora_A.weight) and an adapter_config.json
    that peft.PeftModel.from_pretrained accepts; fetch: as llama.save_model's."""
    layers = lora_layers(model)
    if not layers:
        raise TuluError("save_adapter: the model has no LoRA layers (add_lora or load_adapter first)")
    first = next(iter(layers.values()))
    r, alpha = first.r, int(first.alpha) if first.alpha == int(first.alpha) else first.alpha
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha,
                  lora_dropout=getattr(first.dropout, "p", 0.0), bias="none",
                  target_modules=sorted({n.rpartition(".")[2] for n in layers}), fan_in_fan_out=False,
                  use_rslora=False, use_dora=False, modules_to_save=None, inference_mode=True,
                  base_model_name_or_path=base_model_name_or_path)
    os.makedirs(out_dir, exist_ok=True)
    write = lambda tmp: write_safetensors(tmp, adapter_tensors(model), fetch=fetch)
    atomic_write(os.path.join(out_dir, ADAPTER_WEIGHTS), write)
    write_json(os.path.join(out_dir, ADAPTER_CONFIG), config)  # last: a config means its weights are complete


# PEFT options that change what an adapter computes; each must be unset (None, False, {}, [], "none")
UNSUPPORTED = ("bias", "use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save",
               "alpha_pattern", "rank_pattern", "layer_replication", "trainable_token_indices",
               "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config")


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json, refused if it asks for an option we do not implement."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isdir(adapter_dir):
        raise TuluError(f"{adapter_dir}: no such adapter folder")
    if not os.path.exists(path):
        raise TuluError(f"{path}: not found (is {adapter_dir} a PEFT adapter folder?)")
    cfg = read_json(path, "a PEFT adapter config")
    if cfg.get("peft_type") != "LORA":
        raise TuluError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (only 'LORA')")
    for key in UNSUPPORTED:
        if cfg.get(key) not in (None, False, {}, [], "none"):
            raise TuluError(f"{path}: {key}={cfg[key]!r} is not supported by tulu (plain LoRA only)")
    if not isinstance(cfg.get("r"), int) or not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise TuluError(f"{path}: needs an integer 'r' and a number 'lora_alpha'")
    return cfg


def read_weights_only(path: str) -> dict[str, torch.Tensor]:
    """A pickled {name: tensor} file (PyTorch's .bin) read by torch.load(weights_only=True), which
    builds only tensors and plain containers: a pickle naming other code is refused, none of it run."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the pickle names a function or class: code it would run
        what = re.search(r"GLOBAL (\S+)", str(e))
        raise TuluError(f"{path}: refused: its pickle would call {what[1] if what else 'code'}, not only "
                        "build tensors (tulu reads .bin files with torch.load(weights_only=True))") from None
    except Exception as e:  # a truncated or foreign file: torch raises what its reader met
        raise TuluError(f"{path}: not a readable PyTorch file ({type(e).__name__})") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                for k, v in tensors.items()):
        raise TuluError(f"{path}: holds no {{name: tensor}} dictionary")
    return tensors


def read_adapter_weights(adapter_dir: str) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """(the file read, {layer: {"lora_A": (R, D), "lora_B": (O, R)}}) of adapter_model.safetensors, or
    else of the adapter_model.bin PEFT <= 0.5 wrote (the released Tulu 2 QLoRA adapters). PEFT's keys,
    with or without the adapter name some versions kept (q_proj.lora_A.default.weight)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path, bin_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS), os.path.join(adapter_dir, ADAPTER_BIN)
    try:
        if not os.path.exists(path) and os.path.exists(bin_path):
            path, tensors = bin_path, read_weights_only(bin_path)
        else:
            tensors = load_file(path)
    except FileNotFoundError:
        raise TuluError(f"{path}: not found") from None
    except SafetensorError as e:
        raise TuluError(f"{path}: not a readable safetensors file ({e})") from None
    out = {}
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX).replace(".default.weight", ".weight")
        layer, _, ab = name.removesuffix(".weight").rpartition(".")
        if ab not in ("lora_A", "lora_B") or not name.endswith(".weight"):
            raise TuluError(f"{path}: tensor {key} is not a LoRA weight (lora_A/lora_B); not supported")
        out.setdefault(layer, {})[ab] = t
    return path, out


def check_adapter(path, model, cfg, weights):
    """Raise unless `weights` hold a rank-r adapter for layers of this model: one for each of its
    LoRA layers and for each linear layer target_modules names."""
    modules, r, alpha = dict(model.named_modules()), cfg["r"], cfg["lora_alpha"]
    targets = cfg.get("target_modules") if cfg.get("layers_to_transform") is None else None
    for n, m in modules.items():
        if n not in weights and (isinstance(m, LoRALinear) or isinstance(m, (nn.Linear, Linear4bit))
                                 and isinstance(targets, list) and n.rpartition(".")[2] in targets):
            raise TuluError(f"{path}: no weights for {n}, a layer the adapter should adapt")
    for name, t in weights.items():
        layer = modules.get(name)
        if not isinstance(layer, (nn.Linear, Linear4bit, LoRALinear)) or set(t) != {"lora_A", "lora_B"}:
            raise TuluError(f"{path}: {name} is not a linear layer of this model, or lacks lora_A or lora_B: "
                            "a different base model?")
        a, b, base = tuple(t["lora_A"].shape), tuple(t["lora_B"].shape), getattr(layer, "base_layer", layer)
        if a[0] != r or b[1] != r or getattr(layer, "r", r) != r or getattr(layer, "alpha", alpha) != alpha:
            theirs = f", the model's LoRA r={layer.r} alpha={layer.alpha}" if layer is not base else ""
            raise TuluError(f"{path}: rank mismatch at {name}: lora_A {a}, lora_B {b}, "
                            f"config r={r} alpha={alpha}{theirs}")
        if (a[1], b[0]) != (base.in_features, base.out_features):
            raise TuluError(f"{path}: {name} adapts a ({b[0]}, {a[1]}) weight, this model's is "
                            f"({base.out_features}, {base.in_features}): a different base model?")


def load_adapter(model: nn.Module, adapter_dir: str, trainable=False, dropout: float | None = None) -> dict:
    """Load a PEFT LoRA adapter (PEFT's, ours, the released Tulu 2 QLoRA ones) into `model`, adding
    LoRALinear layers where it has none yet. The base stays frozen, and A and B unless `trainable`."""
    cfg, (path, weights) = read_adapter_config(adapter_dir), read_adapter_weights(adapter_dir)
    check_adapter(path, model, cfg, weights)
    p = (cfg.get("lora_dropout") or 0.0) if dropout is None else dropout  # None: the config's
    model.requires_grad_(False)
    with torch.no_grad():
        for name, t in weights.items():
            layer = model.get_submodule(name)
            if not isinstance(layer, LoRALinear):
                layer = LoRALinear(layer, cfg["r"], cfg["lora_alpha"], p)
                model.set_submodule(name, layer)
            for ab in ("lora_A", "lora_B"):
                getattr(layer, ab).weight.copy_(t[ab])
                getattr(layer, ab).requires_grad_(trainable)
    return cfg


# -----------------------------------------------------------------------------
# Merging, and the base model on demand


def lora_delta(layer: LoRALinear) -> torch.Tensor:
    """dW = (alpha / r) * B A, float32 (O, D): what merging adds to W (LoRA Sec. 4.1).
    B A is taken before the scaling, in PEFT's order, so bits agree."""
    # exercise: merge
    return (layer.lora_B.weight.float() @ layer.lora_A.weight.float()) * layer.scaling
    # end exercise


def merged_linear(layer: nn.Module, dtype=None) -> nn.Linear:
    """An nn.Linear computing what `layer` computes (LoRA Sec. 4.1):  W' = W + (alpha / r) * B A

    W is the weight the base multiplies by in forward: an NF4 weight dequantized to its compute
    dtype, as open-instruct's merge_lora.py --qlora dequantizes to bf16 first. The sum is taken in
    float32 and rounded once to `dtype` (default: the base's weight dtype, for NF4 its compute dtype)."""
    base = layer.base_layer if isinstance(layer, LoRALinear) else layer
    w = base.dequantize(base.compute_dtype) if isinstance(base, Linear4bit) else base.weight.detach()
    dtype = dtype or w.dtype
    w = w.float() + lora_delta(layer) if isinstance(layer, LoRALinear) else w
    out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")  # no init
    out.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    if base.bias is not None:
        out.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
    return out


def merge_lora(model: nn.Module, dtype=None) -> nn.Module:
    """Fold every LoRALinear into a plain Linear (merged_linear), then dequantize every NF4 layer
    left, so save_model can write the result. Merging a merged model changes nothing."""
    for kind in (LoRALinear, Linear4bit):  # LoRA layers first: they hold NF4 bases
        for name in [n for n, m in model.named_modules() if isinstance(m, kind)]:
            model.set_submodule(name, merged_linear(model.get_submodule(name), dtype))
    return model


@contextmanager
def adapters_disabled(model: nn.Module):
    """Within this block every LoRALinear is its base layer, so the model is its frozen base: DPO's
    reference model without a second copy in memory."""
    before = {m: m.disabled for m in lora_layers(model).values()}
    for m in before:
        m.disabled = True
    try:
        yield model
    finally:
        for m, disabled in before.items():
            m.disabled = disabled
