"""Will a run fit? Its peak memory per device, as arithmetic on config.json (`tulu.py plan`).

The QLoRA paper (arXiv 2305.14314, Sec. 3-4) argues from the parts a run holds: LLaMA-65B's
16-bit weights alone are 130 GB, and full fine-tuning (float32 master weights, gradients,
two Adam states: 16 bytes a parameter) needs over 1 TB. LoRA (arXiv 2106.09685) freezes the
base: only the adapters (~1% of the parameters) get gradients and Adam states. NF4 stores
the frozen base in 4.127 bits a weight (nf4.py); gradient checkpointing keeps each layer's
input alone and rebuilds the rest in backward, a layer at a time; paged AdamW keeps its
states in CPU memory. Together 65B fits one 48 GB GPU: 39 GiB at batch 1 x 512 (45 GiB
with Adam's states on the GPU). Each part is counted as this code holds it: tests/test_plan.py
holds the parts to the model and to autograd, and their peak to measured runs.
Shapes: D hidden, I intermediate, A = H x Dh attention width, V vocabulary, L layers; c bytes
of a compute-dtype value (2 in bf16, 4 in float32).
"""
import argparse
import json
import math
import os
import re

import torch

from llama import LlamaConfig, TuluError, chunk_rows
from machinery.cli import positive_int
from machinery.distributed import uses_fsdp

GIB = 2**30


def projections(cfg) -> list[tuple[int, int]]:
    """(in, out) features of a decoder layer's seven Linears: q, k, v, o, gate, up, down."""
    D, I, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    A, Akv = cfg.num_attention_heads * Dh, cfg.num_key_value_heads * Dh
    return [(D, A), (D, Akv), (D, Akv), (A, D), (D, I), (D, I), (I, D)]


def nf4_bytes(n: int) -> int:
    """An NF4 weight of n values: 4 bits each, an 8-bit scale per block of 64, a float32
    scale per 256 blocks and the scales' mean: 4 + 8/64 + 32/(64*256) = 4.127 bits a value."""
    return n // 2 + n // 64 + 4 * math.ceil(n / (64 * 256)) + 4


def layer_activations(cfg, method, c, r, dropout, shared) -> int:
    """Bytes a decoder layer's forward saves for backward, per token (the tensors autograd
    keeps in llama.DecoderLayer; the tests count them). shared: full fine-tuning with weights
    in the compute dtype (float32, or FSDP's gathered bf16), where Linears that read one
    tensor keep it once; under autocast each keeps its own bf16 copy."""
    D, I, A = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim
    kept = 4 * A * c + 4 * cfg.num_attention_heads  # attention: q, k, v (GQA heads repeated), out, logsumexp
    kept += 3 * I * c  # the MLP: gate(x), silu(gate(x)), up(x)
    kept += 2 * 4 * (D + 1)  # each RMSNorm: its input and 1/rms, in float32
    if method == "full":  # each Linear: its input, for its weight's gradient
        if shared:  # each norm's x/rms and output (which q, k, v read); down's input
            return kept + 2 * 2 * c * D + I * c
        return kept + 2 * 4 * D + (5 * D + I) * c  # each norm's x/rms; each Linear's bf16 input
    kept += 7 * r * c  # each lora_A's output, lora_B's input
    if dropout or c < 4:  # each LoRA: its dropout mask (a byte a value) and lora_A's own input
        return kept + (5 * D + A + I) * (c + (dropout > 0))
    return kept + (2 * D + I) * c  # lora_A's input, once per tensor read: the norms' outputs, down's input


def logits_bytes(cfg, method, c, n, device) -> int:
    """llama.LabelLogps on n learned tokens, a chunk of rows at a time (llama.chunk_rows): the
    chunk's logits in the compute dtype and twice in float32 (a copy, its log-softmax); kept
    for backward, softmax - onehot per logit (n, V) when lm_head trains (full, which keeps the
    hidden rows too), else times W (n, D); backward's gradient of that is as large again."""
    V, D = cfg.vocab_size, cfg.hidden_size
    kept = n * V * c + n * D * 4 if method == "full" else n * D * c
    return kept + max(min(n, chunk_rows(device, V)) * V * (c + 8), kept)


def optimizer_bytes(method, trained, device, split) -> int:
    """AdamW's two float32 states a trained parameter, over `split` FSDP ranks. qlora on one
    GPU pages them (PagedAdamW): they wait in CPU memory, the GPU holds what room is left
    (counted as none); sharded, they stay on the GPU."""
    return 0 if method == "qlora" and device == "cuda" and split == 1 else 8 * trained // split


def plan(cfg, method, rows, seq, lora_r=64, dropout=0.1, checkpointing=False, c=2, device="cuda", world=1,
         fsdp=False) -> dict:
    """One device's parts, in bytes, for micro-batches of `rows` sequences of `seq` tokens, every
    label learned, on `world` ranks: FSDP (fsdp) splits the weights, adapters, gradients and AdamW
    states over them, DDP keeps all on each. A bitsandbytes 4-bit folder's layers load in NF4."""
    L, D, full = cfg.num_hidden_layers, cfg.hidden_size, method == "full"
    nf4 = method == "qlora" or "quantization_config" in cfg.extra
    head, layer = cfg.vocab_size * D, sum(i * o for i, o in projections(cfg))  # lm_head's, a layer's weights
    split, tokens = world if fsdp else 1, rows * seq
    rest = head * (1 if cfg.tie_word_embeddings else 2) + (2 * L + 1) * D  # embeddings, lm_head, norms
    in_use = sum(nf4_bytes(i * o) for i, o in projections(cfg)) if nf4 else layer * c  # a layer
    # weights as stored: full's float32 masters; else the compute dtype, qlora's decoder layers in NF4
    weights = (L * layer + rest) * 4 if full else L * in_use + rest * c
    # trained: every weight, or LoRA's A (r, in) and B (out, r) on each Linear of each layer
    trained = L * layer + rest if full else L * sum(lora_r * (i + o) for i, o in projections(cfg))
    # activations: what each layer's forward saves for backward (checkpointing: its input alone)
    shared = full and (c == 4 or fsdp)
    one_layer = tokens * layer_activations(cfg, method, c, lora_r, dropout, shared)
    residual = 4 if full and not shared else c  # full's residual stream is float32 under autocast
    saved = tokens * residual * D if checkpointing else one_layer
    final_norm = tokens * D * (8 if full else 4)  # its float32 input (and x/rms, where it trains)
    # weights held twice while in use: qlora's largest weight dequantized (int64 pairs of float32
    # values, then cast to c); FSDP's root unit (embeddings, lm_head) and two layers gathered (one on
    # the CPU, where backward does not prefetch the next: distributed.shard), full's
    # gradients of lm_head and a layer before their reduce-scatter; full's bf16 casts under autocast
    copies = max(i * o for i, o in projections(cfg)) * (4 if c == 4 else 4 + c) if nf4 else 0
    if fsdp:
        copies += 2 * head * c + (1 + (device == "cuda")) * in_use + (head + layer) * c * full
    elif full and c < 4:
        copies += L * layer * c
    return dict(weights=weights // split, adapters=0 if full else 4 * trained // split,
                gradients=4 * trained // split, optimizer=optimizer_bytes(method, trained, device, split),
                activations=L * saved + final_norm, recomputed=one_layer if checkpointing else 0,
                logits=logits_bytes(cfg, method, c, rows * (seq - 1), device), weight_copies=copies)


def peak(p: dict) -> int:
    """What is held at once. Forward ends holding the activations and the logits' buffers;
    backward frees each layer's activations as it writes its gradients (rebuilding one layer
    at a time under checkpointing): the larger side counts, not both."""
    held = p["weights"] + p["adapters"] + p["optimizer"] + p["weight_copies"]
    return held + max(p["activations"] + max(p["logits"], p["recomputed"]), p["gradients"] + p["recomputed"])


# -----------------------------------------------------------------------------
# `tulu.py plan` (its flags, print_plan), and the line sft and dpo print at the start


def size(text: str) -> int:
    """Bytes of "24GiB" (2**30 each) or "48GB" (10**9 each), for --device-memory."""
    m = re.fullmatch(r"([0-9.]+) *([kmg]?)(i?)b", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 24GiB or 48GB")
    return int(float(m[1]) * (1024 if m[3] else 1000) ** "_kmg".index(m[2] or "_"))


def plan_flags(p):
    p.add_argument("--model", required=True, help="HF Llama folder (its config.json alone is read)")
    p.add_argument("--method", choices=["qlora", "lora", "full"], default="qlora", help="default %(default)s")
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="sequences a micro-batch, DPO's two a pair (default %(default)s, Tulu 2's recipes)")
    p.add_argument("--max-seq-length", type=positive_int, default=8192, help="default %(default)s, Tulu 2's")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-r", type=positive_int, default=64, help="default %(default)s")
    p.add_argument("--lora-dropout", type=float, default=0.1, help="default %(default)s, sft's (dpo's: 0)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="default %(default)s")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--nproc", type=positive_int, default=1, help="torchrun's --nproc_per_node (default 1)")
    p.add_argument("--fsdp", action="store_true", help="sft's --fsdp: shard lora/qlora (full on 2+ ranks is)")
    p.add_argument("--device-memory", type=size,
                   help="e.g. 24GiB or 48GB: does it fit? else the largest batch that does")
    p.add_argument("--json", action="store_true", help="print one JSON object: total_bytes and the parts")


def settings(args, world) -> dict:
    """plan()'s arguments for a run's TrainConfig (sft; dpo: two sequences a pair) or plan's flags.
    FSDP2 as the run has it (uses_fsdp); a bitsandbytes 4-bit folder allows neither it nor full."""
    cfg = LlamaConfig.from_json(os.path.join(args.model, "config.json"))
    full, fsdp = args.method == "full", uses_fsdp(args.method, args.fsdp, world)
    if "quantization_config" in cfg.extra and (fsdp or full):  # its weights are NF4 codes
        need = "--method full needs the 16-bit base" if full else "--fsdp needs its base model"
        raise TuluError(f"{args.model}: a bitsandbytes 4-bit folder: {need}")
    return dict(cfg=cfg, method=args.method,
                rows=args.batch_size * (2 if args.command == "dpo" else 1), seq=args.max_seq_length,
                lora_r=args.lora_r, dropout=args.lora_dropout, checkpointing=args.gradient_checkpointing,
                c=args.dtype.itemsize, device=args.device, world=world, fsdp=fsdp)


def run_line(args) -> str:
    total = peak(plan(**settings(args, args.dist.world)))
    return f"memory plan: {total / GIB:.2f} GiB per device at batch {args.batch_size} x " \
           f"{args.max_seq_length} (tulu.py plan: its parts)"


def print_plan(args):
    """`tulu.py plan`: each part and the peak; with --device-memory whether it fits, or else
    the largest batch that does (0: none); --json: one object."""
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")  # as --dtype auto
    args.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    s, memory = settings(args, args.nproc), args.device_memory
    parts = plan(**s)
    total = peak(parts)
    fits = None if memory is None else total <= memory
    best = None if memory is None else next(
        (b for b in range(s["rows"], 0, -1) if peak(plan(**{**s, "rows": b})) <= memory), 0)
    if args.json:
        return print(json.dumps(dict(total_bytes=total, parts=parts, fits=fits, largest_batch=best)))
    other = plan(**{**s, "checkpointing": not s["checkpointing"]})["activations"]
    flip = "without" if s["checkpointing"] else "with"
    print(f"{args.model}: --method {args.method}, batch {args.batch_size} x {args.max_seq_length}, "
          f"{str(args.dtype)[6:]}, on each of {args.nproc} {args.device} device(s){' (FSDP)' * s['fsdp']}:")
    for k, v in [*parts.items(), ("peak", total)]:
        print(f"  {k:14s} {v / GIB:8.2f} GiB")
    print("peak = weights + adapters + optimizer + weight_copies\n"
          "       + max(activations + max(logits, recomputed), gradients + recomputed)\n"
          f"activations {flip} --gradient-checkpointing: {other / GIB:.2f} GiB")
    if not parts["optimizer"]:
        print(f"AdamW's states are paged to CPU memory: {2 * parts['gradients'] / GIB:.2f} GiB there")
    if memory is not None:
        verdict = "yes" if fits else f"no; batch {best} does" if best else "no, not even batch 1"
        print(f"fits in {memory / GIB:.2f} GiB: {verdict}")
