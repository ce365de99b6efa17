"""Chapter 5: the Tulu 2 recipe -- supervised fine-tuning, DPO, merging, chat.

What this file teaches: how the pieces of the earlier chapters become the
training runs of Tulu 2 (Ivison et al. 2023, arXiv 2311.10702): the chat
format and which tokens are learned, batches, the optimiser and learning-rate
schedule of the model cards, gradient accumulation that weighs every token
equally, QLoRA's memory savings (arXiv 2305.14314), DPO's preference loss
(arXiv 2305.18290), checkpoints that resume exactly, training on several GPUs
with torchrun (DDP for LoRA, FSDP2 for full fine-tuning), and the command line.

Shapes: B batch, T time (tokens), V vocabulary.  Read top to bottom; the
command line is at the bottom.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field, fields

import torch

import dpo
import llama
from llama import TuluError, Tokenizer, load_model, save_model
from tqdm import tqdm
from machinery.checks import (check_batch_size, check_output, check_vocab,
                              folder_tokenizer, tokenizer_source, warn_beyond_context)
from machinery.data import (ChatFormat, default_workers, example_lengths, load_examples,
                            read_jsonl, read_objects)
from machinery.demo import DEMO_HELDOUT, print_answers, tiny_default_model, tiny_sft_model
from machinery.distributed import (RankError, SINGLE, all_sum, data_parallel, deal, dist_of, error_text,
                                   grad_sync, is_sharded, rank0, rank0_first, setup_distributed,
                                   shard, together, undeal)
from machinery.evaluate import (answer_prompts, check_eval_args, choice_metrics, choice_scores, data_kind,
                                greedy_answers, preference_metrics, read_choices, report, sft_metrics)
from machinery.exercises import EXERCISES, make_exercises
from machinery.fast import compile_layers, use_fast_dropout
from machinery.outputs import copy_tokenizer, read_prompt, save_outputs, stop_ids, stream_reply
from machinery.plan import print_plan, run_line, size as plan_size
from machinery.runs import Run, check_resume

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")

# -----------------------------------------------------------------------------
# The chat format and the data files (Tulu 2 / open-instruct formats)

ROLE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}


def chat_text(messages, eos: str = "</s>") -> str:
    """The Tulu format, turn after turn, each content stripped:

        <|system|>\n{c}\n   <|user|>\n{c}\n   <|assistant|>\n{c}{eos}\n

    {eos} is the tokenizer's EOS token written as text ("</s>" for Llama 2,
    "<|end_of_text|>" for Llama 3), which the tokenizer turns into the EOS id."""
    text = ""
    for m in messages:
        if m["role"] not in ROLE_HEADERS:
            raise ValueError(f"unknown role {m['role']!r} (expected system, user or assistant)")
        end = eos if m["role"] == "assistant" else ""
        text += ROLE_HEADERS[m["role"]] + m["content"].strip() + end + "\n"
    return text


def eos_text(tokenizer) -> str:
    if not tokenizer.eos_text:
        raise ValueError("the tokenizer names no EOS token (tokenizer_config.json eos_token), which the "
                         "chat format writes after each answer")
    return tokenizer.eos_text


def encode_messages(messages, tokenizer, max_seq_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation, as open-instruct's
    encode_with_messages_format (Tulu 2) makes them: the chat text (with the
    tokenizer's EOS text), stripped, tokenized with BOS where the tokenizer adds
    one, and cut on the right to max_seq_length; labels are the
    ids with -100 on every system and user turn and on the "<|assistant|>\n"
    that follows one. So the model learns the replies, their EOS and, after
    a non-final EOS, the newline (Llama 2 with legacy=True: "▁", "\n").

    Where a turn ends is found as open-instruct finds it: by tokenizing the
    conversation up to that turn on its own. Kept on purpose, as there: BOS is
    learned when a conversation starts with an assistant turn, and so is the
    header of an assistant turn that follows another one."""
    if not messages:
        raise ValueError("no messages")
    # exercise: encode_messages
    eos = eos_text(tokenizer)
    prefix_len = lambda text: len(tokenizer.encode(text, bos=True)[:max_seq_length])
    ids = tokenizer.encode(chat_text(messages, eos).strip(), bos=True)[:max_seq_length]
    labels = list(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if i == 0 else prefix_len(chat_text(messages[:i], eos))
        answer_next = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        header = ROLE_HEADERS["assistant"] if answer_next else ""
        end = prefix_len(chat_text(messages[:i + 1], eos) + header)
        labels[start:end] = [-100] * len(labels[start:end])
        if end >= max_seq_length:
            break
    return ids, labels
    # end exercise


def encode_prompt(messages, tokenizer) -> list[int]:
    """Ids of a conversation ending with a user turn, then "<|assistant|>\n", for
    the model to write the answer: tokenized exactly as in training. (open-instruct's
    evaluation writes "<s>" into the prompt text instead, which with legacy=False
    encodes the first "<|user|>" without "▁", unlike training.)"""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user turn")
    return tokenizer.encode(chat_text(messages, eos_text(tokenizer)) + ROLE_HEADERS["assistant"], bos=True)


def final_answer_start(labels):
    """Index where the last run of learned labels begins: the final assistant
    answer, since encode_messages masks the "<|assistant|>\n" header before it."""
    i = len(labels)
    while i > 0 and labels[i - 1] != -100:
        i -= 1
    return i


def encode_pair(chosen, rejected, tok, max_seq_length, encode=encode_messages):
    """Encode both conversations with the SFT chat format and learn only the final
    assistant answer (the shared turns cancel in DPO's margin anyway). None when
    truncation would cut an answer away entirely. `encode`: encode_messages or
    encode_messages_fast, the same ids and labels."""
    out = ()
    for msgs in (chosen, rejected):
        ids, labels = encode(msgs, tok, max_seq_length=10**9)
        start = final_answer_start(labels)
        if start >= max_seq_length:
            return None
        out += (ids[:max_seq_length], ([-100] * start + labels[start:])[:max_seq_length])
    return out


# The data files as training examples: machinery/data.py reads them, encodes them
# with this chat format (a fast path with the same ids and labels), by worker
# processes, into flat storage, and caches them.
CHAT = ChatFormat(chat_text, eos_text, ROLE_HEADERS, encode_pair)


def load_sft_data(path, tok, max_seq_length, workers=1, cache=None):
    """Every conversation of a JSONL file as (ids, labels), in order, held flat
    (Examples); conversations with nothing to learn are dropped and counted. workers,
    cache: see load_examples."""
    return load_examples(path, "sft", tok, max_seq_length, CHAT, workers, cache)


def load_pref_data(path, tok, max_seq_length, workers=1, cache=None):
    """Every preference pair as (chosen ids, chosen labels, rejected ids, rejected labels)."""
    return load_examples(path, "prefs", tok, max_seq_length, CHAT, workers, cache)


def cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tulu")


def data_cache_dir():
    return os.path.join(cache_dir(), "data")


# -----------------------------------------------------------------------------
# The optimisation recipe of the model cards


def linear_schedule(step, warmup_steps, total_steps):
    """LR multiplier: 0 -> 1 linearly over the warmup steps, then 1 -> 0 linearly at
    the last step (HF's get_linear_schedule_with_warmup, used by open-instruct)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TuluError("--device cuda: no CUDA device is available")
    return name


def resolve_dtype(name, device):
    """The compute dtype: --dtype auto is bf16 on a CUDA GPU that supports it (as QLoRA
    and the Tulu 2 runs), fp32 elsewhere; a GPU without bf16 (V100, T4) computes in fp32."""
    bf16_ok = device != "cuda" or torch.cuda.is_bf16_supported()
    if name == "auto" and device == "cuda" and not bf16_ok:
        print("note: this GPU has no bf16 arithmetic (torch.cuda.is_bf16_supported() is False): "
              "computing in fp32 (--dtype fp32)")
    if name == "bf16" and not bf16_ok:
        raise TuluError("--dtype bf16: this GPU has no bf16 arithmetic (torch.cuda.is_bf16_supported() "
                        "is False); use --dtype fp32")
    if name == "auto":
        return torch.bfloat16 if device == "cuda" and bf16_ok else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def storage_dtype(args) -> torch.dtype:
    """The dtype the weights are held in while training. What trains keeps float32
    master weights whatever the compute dtype (a bf16 weight near 0.02 cannot move by
    less than ~6e-5, so at Tulu 2's lr of 2e-5 most would never change): --method full
    loads the model in float32 and computes under bf16 autocast, as open-instruct and
    transformers' Trainer do. A frozen base (lora) stays in the compute dtype; qlora's
    in NF4, with embeddings and norms in the compute dtype."""
    return torch.float32 if args.method == "full" else args.dtype


RECIPES = {  # (command, method family) -> defaults
    # Tulu 2 SFT: arXiv 2311.10702 Sec. 3 / model cards
    ("sft", "full"): dict(lr=2e-5, epochs=2, warmup_ratio=0.03, max_grad_norm=0.0, batch_size=4,
                          grad_accum=32, max_seq_length=8192),
    # Tulu 2 QLoRA 70B card; clip 0.3 from QLoRA (2305.14314)
    ("sft", "lora"): dict(lr=1e-4, epochs=5, warmup_ratio=0.03, max_grad_norm=0.3, batch_size=4,
                          grad_accum=32, max_seq_length=8192),
    ("dpo", "full"): dict(lr=5e-7, epochs=3, warmup_ratio=0.1, max_grad_norm=0.0, batch_size=4, grad_accum=8,
                          max_seq_length=2048),   # Tulu 2 DPO: beta 0.1, lr 5e-7, batch 32, 3 epochs
    ("dpo", "lora"): dict(lr=5e-6, epochs=3, warmup_ratio=0.1, max_grad_norm=0.3, batch_size=4, grad_accum=8,
                          max_seq_length=2048),   # lr from alignment-handbook's zephyr-7b-dpo-qlora recipe
    # The tiny demo, tuned by bench/demo_exact_match.py (held-out exact match): its adapters learn
    # best at 5e-3, every weight at 5e-4 (62% right; 1e-3: 60%, 2e-3: 57%, 3e-3: 42%); DPO at 1e-4
    # raises held-out reward accuracy without costing right answers (3e-4: one fewer of 40; 1e-3:
    # a sixth fewer).
    ("sft", "demo"): dict(lr=5e-3, epochs=3, warmup_ratio=0.03, max_grad_norm=1.0, batch_size=16,
                          grad_accum=1, max_seq_length=256),
    ("sft", "demo-full"): dict(lr=5e-4, epochs=3, warmup_ratio=0.03, max_grad_norm=1.0, batch_size=16,
                               grad_accum=1, max_seq_length=256),
    ("dpo", "demo"): dict(lr=1e-4, epochs=2, warmup_ratio=0.1, max_grad_norm=1.0, batch_size=16, grad_accum=1,
                          max_seq_length=256),
}


SOURCES = {("sft", "full"): "Tulu 2 SFT, arXiv 2311.10702", ("sft", "lora"): "Tulu 2 QLoRA 70B model card",
           ("dpo", "full"): "Tulu 2 DPO, arXiv 2311.10702",
           ("dpo", "lora"): "alignment-handbook zephyr-7b-dpo-qlora for the lr, else Tulu 2 DPO"}


def recipe_help(command, key, what, lora_source=None):
    """'what (default X full [source], Y lora/qlora [source]; Z for the demo[, W with full])'."""
    r = lambda m: RECIPES[(command, m)][key]
    demo_full = RECIPES.get((command, "demo-full"), {}).get(key, r("demo"))
    with_full = f", {demo_full} with full" if demo_full != r("demo") else ""
    return (f"{what} (default {r('full')} for full fine-tuning [{SOURCES[(command, 'full')]}], {r('lora')} "
            f"with lora/qlora [{lora_source or SOURCES[(command, 'lora')]}]; {r('demo')} for the tiny "
            f"demo{with_full})")


def positive_int(s):
    if not s.lstrip("-").isdigit() or int(s) <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive integer")
    return int(s)


def count(s):
    if not s.isdigit():
        raise argparse.ArgumentTypeError(f"{s!r} is not a non-negative integer")
    return int(s)


def flag(help, default=None, recipe=False, **kw):
    """A TrainConfig field and its command-line flag: `help` (a dict by command where the
    commands differ), recipe=True where the default comes from RECIPES (None until
    TrainConfig.resolve), kw for argparse (type, choices, action, nargs, metavar)."""
    return field(default=default, metadata=dict(help=help, recipe=recipe, kw=kw))


@dataclass
class TrainConfig:
    """What a training run (sft, dpo, the demo's pre-training) needs to know. The command
    line is made from these fields (training_flags); the model cards' recipes fill what is
    None (resolve). Attributes keep the flags' names: --max-seq-length is max_seq_length."""
    command: str = "sft"
    model: str | None = flag("HF Llama folder (default: the tiny demo model, built once and cached under "
                             "$XDG_CACHE_HOME/tulu)")
    output: str | None = flag("output folder (default: out/{command}-METHOD, or the --resume folder)")
    method: str = flag("qlora: NF4 base + LoRA + paged AdamW (QLoRA, arXiv 2305.14314); lora: LoRA on a "
                       "bf16/fp32 base; full: every weight (default: %(default)s)", "qlora",
                       choices=["qlora", "lora", "full"])
    epochs: int | None = flag("passes over the data", recipe=True, type=positive_int)
    max_steps: int = flag("stop after N optimiser steps (default 0: all epochs)", 0, type=count)
    lr: float | None = flag("peak learning rate", recipe=True, type=float)
    batch_size: int | None = flag("examples per micro-batch", recipe=True, type=positive_int)
    grad_accum: int | None = flag("micro-batches per optimiser step; batch-size x grad-accum = {batch}, the "
                                  "model cards' batch", recipe=True, type=positive_int)
    max_seq_length: int | None = flag("truncate longer examples", recipe=True, type=positive_int)
    warmup_ratio: float | None = flag("linear warmup over this fraction of the steps, then linear decay to 0",
                                      recipe=True, type=float)
    max_grad_norm: float | None = flag("gradient clipping, 0 = off", recipe="QLoRA, arXiv 2305.14314",
                                       type=float)
    weight_decay: float = flag("AdamW weight decay (default 0, Tulu 2)", 0.0, type=float)
    adam_betas: tuple = flag("AdamW betas (default 0.9 0.999, Tulu 2)", (0.9, 0.999), type=float, nargs=2,
                             metavar=("BETA1", "BETA2"))
    adam_eps: float = flag("AdamW epsilon (default 1e-8, Tulu 2)", 1e-8, type=float)
    lora_r: int = flag("LoRA rank (default 64, Tulu 2 QLoRA model card)", 64, type=positive_int)
    lora_alpha: float = flag("LoRA alpha (default 16, Tulu 2 QLoRA model card)", 16, type=float)
    lora_dropout: float | None = flag("LoRA dropout (default 0.1 for sft, Tulu 2 QLoRA model card; 0 for dpo "
                                      "so that policy = reference at step 0, as TRL)", type=float)
    gradient_checkpointing: bool = flag("recompute activations in backward (QLoRA)", False,
                                        action="store_true")
    compile: bool = flag("torch.compile each decoder layer (default: off): fused kernels for the elementwise "
                         "work, meant for CUDA; the first step compiles for tens of seconds, and on a CPU "
                         "the step is no faster (README)", False, action="store_true")
    group_by_length: bool = flag(
        "cut each step's examples into micro-batches longest first, so that little is padded: faster on data "
        "of mixed lengths; the step's examples and summed gradient stay the same, only dropout masks and "
        "float rounding differ (default: off, shuffled order, as transformers' group_by_length)", False,
        action="store_true")
    seed: int = flag("random seed (default 42, open-instruct's)", 42, type=int)
    save_every: int = flag("also checkpoint every N steps (default 0: by time only, --save-minutes)", 0,
                           type=count, metavar="N")
    save_minutes: float = flag(
        "checkpoint once M minutes have passed since the last checkpoint (default %(default)g: a crash or "
        "SIGKILL loses at most that much, while writing a checkpoint, seconds for an adapter, about 80 s "
        "at 1 GB/s for a 7B full fine-tune's 75 GiB of float32 weights and AdamW state, costs a few percent "
        "of the time; the demo ends sooner; 0: off). Ctrl-C and SIGTERM always checkpoint, after the step in "
        "progress", 30.0, type=float, metavar="M")
    resume: str | None = flag("continue the run in this output folder from its checkpoint, with the same "
                              "settings, model and data; a finished run exits at once")
    fsdp: bool = flag("under torchrun, lora and qlora too shard the frozen base, the adapters and AdamW's "
                      "state over the ranks (FSDP2, a decoder layer gathered at a time; qlora's AdamW then "
                      "unpaged), as Answer.AI's FSDP+QLoRA trained 70B on two 24 GB GPUs (default: DDP, "
                      "each rank holding the whole base: faster where it fits; full always shards)", False,
                      action="store_true")
    device: str = flag("default: cuda if available", "auto", choices=["auto", "cpu", "cuda"])
    dtype: str = flag("compute dtype (default: bf16 on CUDA, as QLoRA; fp32 on CPU); what trains keeps "
                      "float32 master weights", "auto", choices=["auto", "bf16", "fp32"])
    num_workers: int = flag("processes that encode --data (default: this machine's cores, at most 8; here "
                            "%(default)s); the encoding is cached under $XDG_CACHE_HOME/tulu/data",
                            default_workers(), type=positive_int)
    data: str | None = flag({"sft": "JSONL of {\"messages\": [...]} (default: data/sft_train.jsonl)",
                             "dpo": "JSONL of {\"chosen\": [...], \"rejected\": [...]} (default: "
                                    "data/prefs_train.jsonl)"})
    adapter: str | None = flag({"dpo": "start from this SFT adapter; it is also the reference model"})
    beta: float = flag({"dpo": "DPO beta (default 0.1, Tulu 2 DPO)"}, 0.1, type=float)
    loss: str = flag({"dpo": "sigmoid: DPO (Tulu 2); dpo_norm: on average log-probs (Tulu 3); ipo (default "
                             "%(default)s)"}, "sigmoid", choices=list(dpo.LOSS_TYPES))
    label_smoothing: float = flag({"dpo": "conservative DPO epsilon (default 0)"}, 0.0, type=float)
    dist: object = field(default=None, repr=False)  # this process among torchrun's (setup_distributed)

    def resolve(self, demo: bool) -> "TrainConfig":
        """Fill what is None from the recipe (the tiny demo's when there is no --model);
        resolve device and dtype; the output folder."""
        family = "demo" if demo else ("full" if self.method == "full" else "lora")
        if demo and self.method == "full" and (self.command, "demo-full") in RECIPES:
            family = "demo-full"
        for k, v in RECIPES[(self.command, family)].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.lora_dropout is None:  # DPO turns dropout off so that policy == reference at step 0 (as TRL)
            self.lora_dropout = 0.0 if self.command == "dpo" else 0.1
        self.device = resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)
        if self.resume and not self.output:  # continue in the folder being resumed
            r = os.path.normpath(self.resume)
            self.output = os.path.dirname(r) if os.path.basename(r) == "checkpoint" else r
        self.output = self.output or os.path.join("out", f"{self.command}-{self.method}")
        return self


def training_flags(p, command):
    """The flags of `sft` or `dpo`, one per TrainConfig field that the command has."""
    for f in fields(TrainConfig):
        help = f.metadata.get("help")
        help = help.get(command) if isinstance(help, dict) else help
        if help is None:
            continue
        recipe = f.metadata["recipe"]
        if recipe:
            b = RECIPES[(command, "full")]
            help = recipe_help(command, f.name, help.format(batch=b["batch_size"] * b["grad_accum"]),
                               lora_source=recipe if isinstance(recipe, str) else None)
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default,
                       help=help.replace("{command}", command), **f.metadata["kw"])


def build_policy(args, path):
    """Load the model for training as --method says. full: every weight trains
    (AdamW); lora: a frozen base + LoRA adapters; qlora: the base quantised to
    NF4 while loading, LoRA adapters on top, and paged AdamW (QLoRA Sec. 3)."""
    from lora import add_lora, load_adapter
    fsdp = dist_of(args).world > 1 and (args.method == "full" or args.fsdp)  # read to the CPU, then shard
    model = load_model(path, dtype=storage_dtype(args), device="cpu" if fsdp else args.device,
                       quantize="nf4" if args.method == "qlora" else None)
    if args.method == "full":
        if args.adapter:
            raise TuluError("--adapter needs --method lora or qlora (merge it first for full fine-tuning)")
        model.requires_grad_(True)
    elif args.adapter:
        load_adapter(model, args.adapter, trainable=True, dropout=args.lora_dropout)
    else:
        add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    use_fast_dropout(model)  # LoRA's nn.Dropout, drawn from a quarter of the random numbers
    model.gradient_checkpointing = args.gradient_checkpointing
    if args.compile:
        compile_layers(model)
    return shard(model, dist_of(args), args.dtype) if fsdp else model


def build_optimizer(args, model):
    from nf4 import PagedAdamW
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps, weight_decay=args.weight_decay)
    if args.method == "qlora" and not is_sharded(model):  # sharded, AdamW's state is 1/N a rank already
        return PagedAdamW(params, **kw)
    # one fused kernel per update on CPU and CUDA (2.3x the per-tensor loop on 2 cores), as
    # transformers' Trainer defaults to (adamw_torch_fused, torch >= 2.8)
    return torch.optim.AdamW(params, fused=True, **kw)


# -----------------------------------------------------------------------------
# What one training example contributes: SFT (here) and DPO (dpo.py)


class SFTTask:
    """Next-token cross-entropy on the learned (label != -100) tokens. Gradient
    accumulation divides the *sum* of token losses by the number of learned
    tokens in the whole optimiser step, so every token weighs the same however
    the step is split into micro-batches (open-instruct's reduce_loss="sum")."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def collate(self, examples):
        return dpo.pad_batch(examples, self.pad_id)

    def count(self, batch):  # the denominator: learned tokens
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, model, batch, denom):
        # log p of each learned token (llama.label_logps: the whole logits are never built)
        logp = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return -logp.sum() / denom, {}


class DPOTask:
    """DPO on (chosen, rejected) pairs: both answers in one forward pass, the loss
    summed over pairs and divided by the pairs in the optimiser step. Reference
    log-probs ride along with each pair when cache_reference computed them before
    the first update; otherwise (LoRA) they come from the same model with its
    adapters switched off: one model in memory either way."""

    def __init__(self, args, pad_id):
        self.args, self.pad_id, self.avg = args, pad_id, dpo.uses_average(args.loss)

    def collate(self, pairs):
        batch = dpo.collate_pairs(pairs, self.pad_id)
        if len(pairs[0]) > 4:  # cached reference log-probs ride along with the pair
            batch["ref"] = torch.tensor([[p[4], p[5]] for p in pairs])
        return batch

    def count(self, batch):  # the denominator: pairs
        return batch["input_ids"].shape[0] // 2

    def loss(self, model, batch, denom):
        from lora import adapters_disabled
        pc, pr = dpo.concatenated_logps(model, batch, self.avg)
        if "ref" in batch:
            rc, rr = batch["ref"].unbind(-1)
        else:
            with torch.no_grad(), adapters_disabled(model):
                rc, rr = dpo.concatenated_logps(model, batch, self.avg)
        a = self.args
        losses, cr, rj = dpo.dpo_loss(pc, pr, rc, rr, a.beta, a.loss, a.label_smoothing)
        return losses.sum() / denom, dpo.dpo_metrics(losses, cr, rj, pc, pr, reduction="sum")


def on(batch, device):
    """A collated batch on the device, without rank_batches' weight mark."""
    return {k: v.to(device) for k, v in batch.items() if k != "weight"}


def eval_batches(model, examples, task, args, desc, d=None):
    """(examples, device batch) in order, the model in eval mode (no dropout); under
    torchrun (d), this rank's share (deal), the first batch standing in where short."""
    model.eval()
    chunks = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    for chunk in tqdm(deal(chunks, d or SINGLE), desc=desc, leave=False):
        yield chunk, on(task.collate(chunk or chunks[0]), args.device)


def autocast(args):
    """bf16 autocast when --dtype is bf16 (QLoRA's bf16 compute), on the CPU too, so that
    a CPU run does the arithmetic a GPU run does: matrix products in bf16, float32
    master weights cast for each one, reductions (softmax, norms) in float32."""
    device_type = torch.device(args.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.dtype == torch.bfloat16)


@torch.no_grad()
def cache_reference(model, pairs, task, args):
    """Append the reference log-probs (rc, rr) to every pair, from the model as it is
    now, before the first update (open-instruct's dpo_tune_cache): the reference
    then needs no second copy of the model in memory."""
    d, scores = dist_of(args), []  # under torchrun each rank scores its share of the batches (deal)
    for chunk, batch in eval_batches(model, pairs, task, args, "reference log-probs", d):
        with autocast(args):
            rc, rr = dpo.concatenated_logps(model, batch, task.avg)
        scores.append([(float(c), float(r)) for c, r in zip(rc, rr)])
    scores = [s for batch in undeal(scores, math.ceil(len(pairs) / args.batch_size), d) for s in batch]
    return [p[:4] + s for p, s in zip(pairs, scores)]


# -----------------------------------------------------------------------------
# The training loop, shared by sft and dpo


def step_batches(n, step, steps_per_epoch, batch_size, grad_accum, seed, lengths=None):
    """Example indices of each micro-batch of optimiser step `step`. The order of
    epoch e is a permutation seeded by seed + e, so a resumed run sees the same data.
    With `lengths` (example_lengths), the step's examples are sorted longest first
    before they are cut into micro-batches, so that similar lengths share one and
    little is padded; the step takes the same examples, and since the loss is summed
    over the step and divided once (SFTTask, DPOTask) its gradient is the same too."""
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    E = batch_size * grad_accum
    chunk = order[i * E:(i + 1) * E]
    if lengths is not None:
        chunk.sort(key=lambda j: -lengths[j])  # stable: equal lengths keep the permutation's order
    return [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]


def train(args, model, examples, task, out, save=None):
    """Tulu 2's loop: AdamW (paged for QLoRA), linear warmup and decay, gradient
    accumulation that sums the token losses of the whole step and divides once by its
    learned tokens (open-instruct's reduce_loss="sum": every token weighs the same however
    the step is split), clipping; the rest (metrics, checkpoints, signals, the non-finite
    stop) is run's, once per step. save() writes the outputs. Returns the metrics' rows."""
    d = dist_of(args)
    E = args.batch_size * args.grad_accum * d.world  # the global batch
    per_epoch = math.ceil(len(examples) / E)
    total = args.max_steps or args.epochs * per_epoch
    warmup = int(total * args.warmup_ratio)
    lengths = example_lengths(examples) if args.group_by_length else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(args, model)
    run = Run(args, out, total, per_epoch)
    run.resume(model, opt)
    net = data_parallel(args, model)
    model.train()
    with run:
        for step in run.steps():
            lr = args.lr * linear_schedule(step, warmup, total)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = step_batches(len(examples), step, per_epoch, args.batch_size, args.grad_accum * d.world,
                               args.seed, lengths)  # one process's micro-batches with the same global batch
            micro = [task.collate([examples[i] for i in c]) for c in deal(idx, d)]  # this rank's share
            denom = max(1, all_sum(d, sum(task.count(b) * b.get("weight", 1) for b in micro))[0])
            for i, b in enumerate(micro):
                with autocast(args), grad_sync(net, last=i == len(micro) - 1):
                    loss, metrics = task.loss(net, on(b, args.device), denom)
                (loss * (b.get("weight", 1) * d.world)).backward()  # DDP and FSDP average over ranks: we sum
                run.add(loss, metrics, b)
            clip = args.max_grad_norm if args.max_grad_norm > 0 else math.inf  # 0: no clipping
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            if run.finite(norm, denom):  # the whole step's loss and gradient norm: every rank alike
                opt.step()
            opt.zero_grad(set_to_none=True)
            run.end_step(step + 1, model, opt, lr)
        return run.finish(model, save)


# -----------------------------------------------------------------------------
# The command line: each command a cmd_<name>(args), then the parser. Defaults come
# from the model cards and papers, each listed with its source in --help; with no
# --model, the tiny demo's own defaults apply (a model trained from scratch needs a
# far larger lr).


def print_config(args):
    has = lambda f: not isinstance(f.metadata.get("help"), dict) or args.command in f.metadata["help"]
    shown = {f.name: getattr(args, f.name) for f in fields(args) if f.name != "dist" and has(f)}
    shown = {k: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v for k, v in shown.items()}
    print("config: " + " ".join(f"{k}={v}" for k, v in shown.items()))


def start_run(ns, default_model, default_data):
    """The run's TrainConfig from the parsed flags, with the defaults filled in (the tiny
    demo's when there is no --model); print it, check the model folder, seed. Returns
    (config, demo?, tokenizer)."""
    args = TrainConfig(**{f.name: getattr(ns, f.name) for f in fields(TrainConfig) if hasattr(ns, f.name)})
    args.dist = setup_distributed(resolve_device(args.device))  # torchrun's process group, if any
    demo = args.model is None
    args.model = args.model or rank0_first(args.dist, default_model)
    args.data = args.data or os.path.join(DATA, default_data)
    args.resolve(demo)
    print_config(args)
    together(args.dist, llama.checkpoint_files, args.model)  # a missing or unusable folder: say so first
    print(together(args.dist, run_line, args))
    check_output(args.output, args.model, args.adapter)
    together(args.dist, check_resume, args)  # before the model loads
    torch.manual_seed(args.seed)
    return args, demo, together(args.dist, lambda m: check_vocab(Tokenizer(m), m), args.model)


def cmd_sft(args):
    args, demo, tok = start_run(args, tiny_default, "sft_train.jsonl")
    examples = rank0_first(args.dist, load_sft_data, args.data, tok, args.max_seq_length, args.num_workers,
                        data_cache_dir())
    check_batch_size(args, examples, "conversation")
    warn_beyond_context(args, examples)
    model = together(args.dist, build_policy, args, args.model)
    os.makedirs(args.output, exist_ok=True)
    train(args, model, examples, SFTTask(pad_id=tok.eos_id), args.output,
          save=lambda: save_outputs(args, model, args.model, args.output))
    if demo:
        prompts, answers = demo_answers(model, tok, args.model)
        print_answers(DEMO_HELDOUT, prompts, {"SFT": answers})


def demo_answers(model, tok, model_dir):
    """The model's greedy answers to the demo's first 40 held-out prompts."""
    prompts = answer_prompts(read_jsonl(DEMO_HELDOUT, "sft"), 40)
    ids = [encode_prompt(p, tok) for p, _ in prompts]
    return prompts, greedy_answers(model, tok, ids, stop_ids(model_dir, tok), show=rank0())


def tiny_default() -> str:
    """The demo's base model, where sft starts without --model: built once
    (machinery/demo.py) with this file's chat format and training loop."""
    return tiny_default_model(cache_dir(), chat_text, train, SFTTask, TrainConfig)


def tiny_sft() -> str:
    """Where dpo, chat and eval start without --model: the tiny default after the
    demo's full SFT, run once by this command line."""
    return tiny_sft_model(tiny_default, main)


def cmd_dpo(args):
    args, demo, tok = start_run(args, tiny_sft, "prefs_train.jsonl")
    pairs = rank0_first(args.dist, load_pref_data, args.data, tok, args.max_seq_length, args.num_workers,
                     data_cache_dir())
    check_batch_size(args, pairs, "preference pair")
    warn_beyond_context(args, pairs)
    model = together(args.dist, build_policy, args, args.model)
    task = DPOTask(args, pad_id=tok.eos_id)
    # The reference is the model as it starts: for full fine-tuning the SFT
    # weights, with --adapter base + SFT adapter (the adapter itself trains on,
    # so switching adapters off would give the bare base, the wrong reference).
    # Score every pair once now; no second model is ever held in memory.
    cached = args.method == "full" or bool(args.adapter)
    if cached:
        pairs = cache_reference(model, pairs, task, args)
    heldout = os.path.join(DATA, "prefs_heldout.jsonl")
    if demo:
        held = load_pref_data(heldout, tok, args.max_seq_length)
        held = cache_reference(model, held, task, args) if cached else held
        before = preference_metrics(model, held, task, args, eval_batches, autocast)
        prompts, sft_answers = demo_answers(model, tok, args.model)  # the policy is the SFT model at step 0
    os.makedirs(args.output, exist_ok=True)
    save = lambda: save_outputs(args, model, args.model, args.output)
    train(args, model, pairs, task, args.output, save=save)
    if demo:
        dpo_answers = demo_answers(model, tok, args.model)[1]
        print_answers(DEMO_HELDOUT, prompts, {"SFT": sft_answers, "DPO": dpo_answers})
        after = preference_metrics(model, held, task, args, eval_batches, autocast)
        print(f"held-out pairs ({heldout}): rewards/accuracy {before['rewards/accuracy']:.2f} -> "
              f"{after['rewards/accuracy']:.2f}, rewards/margin {before['rewards/margin']:.3f} -> "
              f"{after['rewards/margin']:.3f} (at step 0 the policy is the reference: every reward is 0)")


def cmd_merge(args):
    from lora import load_adapter, merge_lora
    dtype = resolve_dtype(args.dtype, "cpu")
    check_output(args.output, args.model)
    check_vocab(folder_tokenizer(args.adapter, args.model), args.model)
    # --qlora: quantise the base to NF4 exactly as for training, then dequantise:
    # the adapter was trained against those weights (open-instruct merge_lora.py --qlora).
    # The base is read in the output dtype, as open-instruct does; each sum W + delta
    # is taken in float32 and rounded once.
    model = load_model(args.model, dtype=dtype, quantize="nf4" if args.qlora else None)
    load_adapter(model, args.adapter)
    merge_lora(model, dtype=dtype)
    save_model(model, args.output)
    copy_tokenizer(args.model, args.output, ("generation_config.json",))
    copy_tokenizer(tokenizer_source(args.adapter, args.model), args.output)
    print(f"merged {args.adapter} into {args.model}: wrote {args.output}")


def cmd_chat(args):
    from lora import load_adapter, merge_lora
    args.device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, args.device)
    args.model = args.model or tiny_sft()
    tok = check_vocab(Tokenizer(tokenizer_source(args.adapter, args.model)), args.model)
    model = load_model(args.model, dtype=dtype, device=args.device)
    if args.adapter:
        load_adapter(model, args.adapter)
        merge_lora(model, dtype=dtype)
    args.stop_ids = stop_ids(args.model, tok)
    history = [{"role": "system", "content": args.system}] if args.system else []
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    while True:
        prompt = args.prompt if args.prompt is not None else read_prompt()
        if prompt is None:
            return
        history.append({"role": "user", "content": prompt})
        reply = stream_reply(model, tok, encode_prompt(history, tok), args, g)
        history.append({"role": "assistant", "content": reply})
        if args.prompt is not None:
            return


def cmd_eval(args):
    """Held-out loss, preference metrics or multiple-choice accuracy of a model (and
    adapter), by the kind of --data (machinery/evaluate.py): one line, and --output as JSON."""
    from lora import load_adapter
    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)
    args.model = args.model or tiny_sft()
    kind = data_kind(args.data, read_objects(args.data))
    check_eval_args(args, kind)
    tok = check_vocab(Tokenizer(tokenizer_source(args.adapter, args.model)), args.model)
    quantize = "nf4" if args.qlora else None
    load = lambda path: load_model(path, dtype=args.dtype, device=args.device, quantize=quantize)
    task = DPOTask(args, pad_id=tok.eos_id) if kind == "prefs" else SFTTask(tok.eos_id)
    if kind == "choice":
        examples = read_choices(args.data, read_objects(args.data))
        dev = read_choices(args.dev, read_objects(args.dev)) if args.dev else []
    else:
        examples = (load_sft_data if kind == "sft" else load_pref_data)(args.data, tok, args.max_seq_length)
    if kind == "prefs" and args.reference:  # scored first, then freed: one model in memory at a time
        check_vocab(tok, args.reference)
        examples = cache_reference(load(args.reference), examples, task, args)
    model = load(args.model)
    if args.adapter:
        load_adapter(model, args.adapter)
    if kind == "choice":
        shots = 5 if args.shots is None and dev else args.shots or 0
        score = lambda rows: choice_scores(model, rows, task, args, eval_batches, autocast)
        metrics = choice_metrics(examples, dev, shots, tok, args, score)
        return report(args, kind, len(examples), metrics, shots)
    metrics = sft_metrics if kind == "sft" else preference_metrics
    report(args, kind, len(examples), metrics(model, examples, task, args, eval_batches, autocast))


def cmd_exercises(args):
    """A student copy with the key bodies blanked, graded by the tests (machinery/exercises.py)."""
    out = args.out_dir
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not args.force:
        raise TuluError(f"{out}: is not empty (--force writes the student copy over it)")
    names = make_exercises(HERE, out)
    file, function, _, selector = EXERCISES[names[0]]
    print(f"wrote a student copy of tulu with {len(names)} exercises to {out}; read {out}/EXERCISES.md and "
          f"start with {names[0]} ({file}: {function}):\n  cd {out} && python -m pytest {selector}")


def cmd_plan(args):
    """Each device's peak memory in such a run, from config.json alone (machinery/plan.py)."""
    print_plan(args)


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
    p.add_argument("--fsdp", action="store_true", help="shard lora/qlora too (full on several ranks is)")
    p.add_argument("--device-memory", type=plan_size,
                   help="e.g. 24GiB or 48GB: does the run fit? else the largest batch that does")
    p.add_argument("--json", action="store_true", help="print one JSON object: total_bytes and the parts")


def exercises_flags(p):
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the copy: new or empty, unless --force")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")


def merge_flags(p):
    p.add_argument("--model", required=True, help="the base model folder")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    p.add_argument("--output", required=True)
    p.add_argument("--qlora", action="store_true", help="quantise the base to NF4 and back first, as the "
                   "adapter was trained (open-instruct merge_lora.py --qlora)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="output dtype (default %(default)s); with --qlora also the dtype the base is "
                        "quantized from, as in training: bf16 on a GPU (open-instruct), fp32 for CPU runs")


def chat_flags(p):
    p.add_argument("--model", help="HF Llama folder (default: the tiny demo model after its SFT, which the "
                                   "demo `tulu.py dpo` starts from; built once and cached)")
    p.add_argument("--adapter", help="PEFT adapter to apply (merged in memory)")
    p.add_argument("--prompt", help="answer this once and exit (default: interactive)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")


def eval_flags(p):
    p.add_argument("--model", help="HF Llama folder (default: the tiny demo model after its SFT)")
    p.add_argument("--adapter", help="PEFT adapter to evaluate on --model; for preference pairs the model "
                                     "without it is the reference")
    p.add_argument("--qlora", action="store_true", help="quantise the base to NF4 first, as a qlora adapter "
                                                        "was trained (default: the base as stored)")
    p.add_argument("--data", required=True, help="JSONL of conversations ({\"messages\"}: loss, perplexity), "
                   "preference pairs ({\"chosen\", \"rejected\"}: DPO's rewards/*) or multiple choice "
                   "({\"question\", \"choices\", \"answer\", \"subject\"}: accuracy)")
    p.add_argument("--reference", help="reference model folder for preference pairs (default with --adapter: "
                                       "--model without the adapter)")
    p.add_argument("--dev", help="multiple choice: JSONL of solved examples, taken in file order by subject")
    p.add_argument("--shots", type=count, help="multiple choice: solved examples before each question "
                                               "(default 5 with --dev, MMLU 5-shot as in QLoRA; 0 without)")
    p.add_argument("--max-seq-length", type=positive_int, default=2048, help=(
        "truncate conversations and pairs; multiple-choice prompts drop solved examples until they fit, "
        "as MMLU's evaluate.py (default %(default)s, MMLU's)"))
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default "
                                                                      "%(default)s)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta of the rewards (default 0.1, "
                                                           "Tulu 2 DPO)")
    p.add_argument("--loss", default="sigmoid", choices=list(dpo.LOSS_TYPES),
                   help="DPO loss for the loss metric (default %(default)s)")
    p.add_argument("--output", help="also write the results to this JSON file")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="default: cuda if available")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="default: bf16 on CUDA, fp32 on CPU")


def build_parser():
    ap = argparse.ArgumentParser(prog="tulu.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    commands = [("sft", "supervised fine-tuning on Tulu-format conversations", cmd_sft,
                 lambda p: training_flags(p, "sft")),
                ("dpo", "direct preference optimisation on chosen/rejected pairs", cmd_dpo,
                 lambda p: training_flags(p, "dpo")),
                ("merge", "fold a LoRA adapter into its base and write an HF folder", cmd_merge, merge_flags),
                ("chat", "talk to a model in the Tulu chat format", cmd_chat, chat_flags),
                ("eval", "held-out loss, preference accuracy or multiple-choice (MMLU-style) accuracy",
                 cmd_eval, eval_flags),
                ("plan", "each device's peak memory in a training run, from config.json alone", cmd_plan,
                 plan_flags),
                ("exercises", "write a student copy in which key functions are left to implement, graded "
                              "by the tests (see its EXERCISES.md)", cmd_exercises, exercises_flags)]
    for name, help, func, flags in commands:
        p = sub.add_parser(name, help=help)
        flags(p)
        p.set_defaults(func=func, **({"label_smoothing": 0.0} if name == "eval" else {}))
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (TuluError, OSError) as e:  # OSError: a missing file, an --output that is a file, a full disk...
        if not isinstance(e, RankError) or rank0():  # every rank has it: rank 0 says it
            print(f"tulu {args.command}: error: {error_text(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # outside the training loop, which saves a checkpoint itself
        print(f"\ntulu {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
