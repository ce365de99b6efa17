"""Chapter 5: the Tulu 2 recipe -- supervised fine-tuning, DPO, merging, chat.

How the earlier chapters become the training runs of Tulu 2 (Ivison et al. 2023, arXiv
2311.10702): the chat format and which tokens are learned, the model cards' recipes as a typed
config, QLoRA (arXiv 2305.14314) and DPO (arXiv 2305.18290) as tasks, and a loop that weighs
every token equally. What a run needs besides the recipe (checkpoints, torchrun, data at scale,
checks, evaluation, the demo, the other commands) is in machinery/, which a reader may skip.

Shapes: B batch, T time (tokens), V vocabulary. Read top to bottom; the command line is last.
"""
import argparse
import functools
import math
import os
from dataclasses import dataclass, field, fields

import torch

import dpo
import llama
from llama import TuluError
from machinery.cli import count, positive_int  # argparse's types of TrainConfig's flags
from machinery import checks, cli, data, demo, distributed as dist, evaluate, exercises, fast, outputs, plan
from machinery import quantize, runs

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

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
        text += ROLE_HEADERS[m["role"]] + m["content"].strip() + eos * (m["role"] == "assistant") + "\n"
    return text


def eos_text(tokenizer) -> str:
    if not tokenizer.eos_text:
        raise ValueError("the tokenizer names no EOS token (tokenizer_config.json eos_token), which the "
                         "chat format writes after each answer")
    return tokenizer.eos_text


def encode_messages(messages, tokenizer, max_seq_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation, as open-instruct's encode_with_messages_format
    (Tulu 2) makes them: the chat text (with the tokenizer's EOS text), stripped, tokenized with
    BOS where the tokenizer adds one, cut on the right to max_seq_length; labels are the ids with
    -100 on every system and user turn and on the "<|assistant|>\n" that follows one. So the model
    learns the replies, their EOS and, after a non-final EOS, the newline (Llama 2 with
    legacy=True: "▁", "\n").

    Where a turn ends is found as open-instruct finds it: by tokenizing the conversation up to
    that turn on its own. Kept on purpose, as there: BOS is learned when a conversation starts
    with an assistant turn, and so is the header of an assistant turn that follows another one."""
    if not messages:
        raise ValueError("no messages")  # as open-instruct's
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


def encode_pair(chosen, rejected, tok, max_seq_length, encode=encode_messages):
    """Both conversations in the SFT chat format, learning only the final assistant answer (the
    shared turns cancel in DPO's margin anyway): the last run of learned labels, as encode_messages
    masks the "<|assistant|>\n" before it. None when truncation would cut an answer away entirely.
    `encode`: encode_messages or data.encode_messages_fast, the same ids and labels."""
    out = ()
    for msgs in (chosen, rejected):
        ids, labels = encode(msgs, tok, max_seq_length=10**9)
        start = len(labels)
        while start > 0 and labels[start - 1] != -100:
            start -= 1
        if start >= max_seq_length:
            return None
        out += (ids[:max_seq_length], ([-100] * start + labels[start:])[:max_seq_length])
    return out


# QLoRA's formats (artidoro/qlora, arXiv 2305.14314): its model cards' prompt, and its rows

QLORA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                "gives helpful, detailed, and polite answers to the user's questions.")
QLORA_HEADERS = {"system": "", "user": "### Human: ", "assistant": "### Assistant: "}
CHAT_HEADERS = {"tulu": ROLE_HEADERS, "qlora": QLORA_HEADERS}  # --chat-format's
QLORA_PROMPT = " ### Assistant:"  # the card's prompt ends "### Human: {prompt} ### Assistant:"


def qlora_text(messages) -> str:
    """The QLoRA card's chat: its system line (or the conversation's own) and a newline,
    then the turns as the oasst1-guanaco text writes them, "### Human: {c}### Assistant: {c}"."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QLORA_SYSTEM}, *messages]
    return "".join(QLORA_HEADERS[m["role"]] + m["content"].strip() + "\n" * (m["role"] == "system")
                   for m in messages)


def encode_instruction(row, tokenizer, source_max_len: int = 1024, target_max_len: int = 256,
                       train_on_source: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one of QLoRA's rows, as artidoro/qlora's DataCollatorForCausalLM
    makes them: the source is the BOS text + row["input"], the target row["output"] + the
    EOS text, each tokenized on its own (no BOS added) and cut on the right to its max
    length; labels are -100 on the source unless train_on_source. A {"text"} row (oasst1,
    Guanaco's data) trains as input "" and output = text, so all but BOS is learned."""
    source, target = (row["input"], row["output"]) if "output" in row else ("", row["text"])
    bos = next((text for text, i in tokenizer.specials.items() if i == tokenizer.bos_id), "")
    source_ids = tokenizer.encode(bos + source)[:source_max_len]
    target_ids = tokenizer.encode(target + eos_text(tokenizer))[:target_max_len]
    labels = source_ids if train_on_source else [-100] * len(source_ids)
    return source_ids + target_ids, labels + target_ids


def encode_prompt(messages, tokenizer, chat_format: str = "tulu") -> list[int]:
    """Ids of a conversation ending with a user turn, then "<|assistant|>\n", for
    the model to write the answer: tokenized exactly as in training. (open-instruct's
    evaluation writes "<s>" into the prompt text instead, which with legacy=False
    encodes the first "<|user|>" without "▁", unlike training.) chat_format="qlora":
    the QLoRA card's prompt, "... ### Human: {prompt} ### Assistant:" (qlora_text)."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user turn")
    if chat_format == "qlora":
        return tokenizer.encode(qlora_text(messages) + QLORA_PROMPT, bos=True)
    return tokenizer.encode(chat_text(messages, eos_text(tokenizer)) + ROLE_HEADERS["assistant"], bos=True)


def chat_template(tokenizer, chat_format: str = "tulu") -> str:
    """The Jinja chat_template an output folder ships (machinery/outputs.py): transformers'
    apply_chat_template then gives encode_messages' ids for a whole conversation (for
    "qlora", BOS + qlora_text's) and encode_prompt's with add_generation_prompt=True."""
    if chat_format == "qlora":
        turns = {role: (header, "\n" * (role == "system")) for role, header in QLORA_HEADERS.items()}
        return outputs.jinja_chat_template(tokenizer, turns, QLORA_PROMPT, system=QLORA_SYSTEM)
    eos = eos_text(tokenizer)
    turns = {role: (header, eos * (role == "assistant") + "\n") for role, header in ROLE_HEADERS.items()}
    return outputs.jinja_chat_template(tokenizer, turns, ROLE_HEADERS["assistant"], strip=True)


# The data files as training examples: machinery/data.py reads them, encodes them with this chat
# format (a fast path with the same ids and labels) by worker processes, and caches them.
CHAT = data.ChatFormat(chat_text, eos_text, ROLE_HEADERS, encode_pair, encode_instruction)


def load_sft_data(path, tok, max_seq_length, workers=1, cache=None, rows=None):
    """Every conversation (or QLoRA row: encode_instruction, keywords `rows`) as (ids, labels)."""
    chat = CHAT._replace(row=functools.partial(encode_instruction, **(rows or {})))
    return data.load_examples(path, "sft", tok, max_seq_length, chat, workers, cache)


def load_pref_data(path, tok, max_seq_length, workers=1, cache=None):
    """Every preference pair as (chosen ids, chosen labels, rejected ids, rejected labels)."""
    return data.load_examples(path, "prefs", tok, max_seq_length, CHAT, workers, cache)


# -----------------------------------------------------------------------------
# The run config: the model cards' recipes, each default with its source

RECIPE_KEYS = ("lr", "epochs", "warmup_ratio", "max_grad_norm", "batch_size", "grad_accum", "max_seq_length")
RECIPES = {key: dict(zip(RECIPE_KEYS, values)) for key, values in {  # (command, family): RECIPE_KEYS' values
    ("sft", "full"): (2e-5, 2, 0.03, 0.0, 4, 32, 8192),  # Tulu 2 SFT: arXiv 2311.10702 Sec. 3 / model cards
    ("sft", "lora"): (1e-4, 5, 0.03, 0.3, 4, 32, 8192),  # Tulu 2 QLoRA 70B card; clip 0.3 from QLoRA
    ("dpo", "full"): (5e-7, 3, 0.1, 0.0, 4, 8, 2048),  # Tulu 2 DPO: beta 0.1, lr 5e-7, batch 32, 3 epochs
    ("dpo", "lora"): (5e-6, 3, 0.1, 0.3, 4, 8, 2048),  # lr from alignment-handbook's zephyr-7b-dpo-qlora
    # The tiny demo, tuned by bench/demo_exact_match.py (held-out exact match): its adapters learn best
    # at 5e-3, every weight at 5e-4 (62% right; 1e-3: 60%, 2e-3: 57%, 3e-3: 42%); DPO at 1e-4 raises
    # held-out reward accuracy without costing right answers (3e-4: one fewer of 40; 1e-3: a sixth fewer).
    ("sft", "demo-lora"): (5e-3, 3, 0.03, 1.0, 16, 1, 256),
    ("sft", "demo-full"): (5e-4, 3, 0.03, 1.0, 16, 1, 256),
    ("dpo", "demo-lora"): (1e-4, 2, 0.1, 1.0, 16, 1, 256),
    ("dpo", "demo-full"): (1e-4, 2, 0.1, 1.0, 16, 1, 256)}.items()}
SOURCES = {("sft", "full"): "Tulu 2 SFT, arXiv 2311.10702", ("sft", "lora"): "Tulu 2 QLoRA 70B model card",
           ("dpo", "full"): "Tulu 2 DPO, arXiv 2311.10702",
           ("dpo", "lora"): "alignment-handbook zephyr-7b-dpo-qlora for the lr, else Tulu 2 DPO"}


def flag(help, default=None, recipe=False, **kw):
    """A TrainConfig field and its flag: help (by command where they differ), recipe (True, or lora's
    source: the default comes from RECIPES), and argparse's keywords."""
    return field(default=default, metadata=dict(help=help, recipe=recipe, kw=kw))


@dataclass
class TrainConfig:
    """What a training run (sft, dpo, the demo's pre-training) needs to know: the flags are made from
    these fields (training_flags), the model cards' recipes fill what is None (resolve)."""
    command: str = "sft"
    model: str | None = flag("HF Llama folder (default: the tiny demo model, built once and cached)")
    output: str | None = flag("output folder (default: out/{command}-METHOD, or the --resume folder)")
    method: str = flag("qlora: NF4 base + LoRA + paged AdamW (QLoRA, arXiv 2305.14314); lora: LoRA on a "
                       "bf16/fp32 base; full: every weight (default: %(default)s)", "qlora",
                       choices=["qlora", "lora", "full"])
    epochs: int | None = flag("passes over the data", recipe=True, type=positive_int)
    max_steps: int = flag("stop after N optimiser steps (default 0: all epochs)", 0, type=count)
    lr: float | None = flag("peak learning rate", recipe=True, type=float)
    lr_scheduler: str = flag("linear: warmup, then linear decay to 0 (Tulu 2); constant: --lr at every step, "
                             "no warmup (QLoRA; transformers' constant) (default %(default)s)", "linear",
                             choices=["linear", "constant"])
    batch_size: int | None = flag("examples per micro-batch", recipe=True, type=positive_int)
    grad_accum: int | None = flag("micro-batches per optimiser step; batch-size x grad-accum = {batch}, the "
                                  "model cards' batch", recipe=True, type=positive_int)
    max_seq_length: int | None = flag("truncate longer examples", recipe=True, type=positive_int)
    warmup_ratio: float | None = flag("warmup over this fraction of the steps", recipe=True, type=float)
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
    compile: bool = flag("torch.compile each decoder layer (default: off): fused elementwise kernels for "
                         "CUDA; the first step compiles for tens of seconds; no faster on a CPU (README)",
                         False, action="store_true")
    group_by_length: bool = flag("cut each step's examples into micro-batches longest first, so that little "
                                 "is padded (same examples and summed gradient; dropout masks and rounding "
                                 "differ) (default: off, as transformers' group_by_length)", False,
                                 action="store_true")
    seed: int = flag("random seed (default 42, open-instruct's)", 42, type=int)
    save_every: int = flag("also checkpoint every N steps (default 0: by time only, --save-minutes)", 0,
                           type=count, metavar="N")
    save_minutes: float = flag("checkpoint once M minutes have passed since the last one (default "
                               "%(default)g: a crash loses at most that much, while a 7B full fine-tune's "
                               "75 GiB checkpoint takes ~80 s; 0: off); Ctrl-C and SIGTERM always "
                               "checkpoint, after the step in progress", 30.0, type=float, metavar="M")
    resume: str | None = flag("continue the run in this output folder from its checkpoint, with the same "
                              "settings, model and data; a finished run exits at once")
    fsdp: bool = flag("under torchrun, lora and qlora too shard the frozen base, adapters and AdamW state "
                      "(FSDP2, a layer gathered at a time; qlora's AdamW unpaged), as Answer.AI's FSDP+QLoRA "
                      "(default: DDP, each rank holding the whole base; full always shards)", False,
                      action="store_true")
    device: str = flag("default: cuda if available", "auto", choices=["auto", "cpu", "cuda"])
    dtype: str = flag("compute dtype (default: bf16 on CUDA, as QLoRA; fp32 on CPU); what trains keeps "
                      "float32 master weights", "auto", choices=["auto", "bf16", "fp32"])
    num_workers: int = flag("processes that encode --data (default: this machine's cores, at most 8; here "
                            "%(default)s); the encoding is cached under $XDG_CACHE_HOME/tulu/data",
                            data.default_workers(), type=positive_int)
    data: str | None = flag({"sft": "JSONL of {\"messages\": [...]}, or QLoRA's rows {\"input\", \"output\"} "
                                    "or {\"text\"} (default: data/sft_train.jsonl)",
                             "dpo": "JSONL of {\"chosen\": [...], \"rejected\": [...]} (default: "
                                    "data/prefs_train.jsonl)"})
    adapter: str | None = flag({"dpo": "start from this SFT adapter; it is also the reference model"})
    beta: float = flag({"dpo": "DPO beta (default 0.1, Tulu 2 DPO)"}, 0.1, type=float)
    loss: str = flag({"dpo": "sigmoid: DPO (Tulu 2); dpo_norm: on average log-probs (Tulu 3); ipo (default "
                             "%(default)s)"}, "sigmoid", choices=list(dpo.LOSS_TYPES))
    label_smoothing: float = flag({"dpo": "conservative DPO epsilon (default 0)"}, 0.0, type=float)
    source_max_len: int = flag({"sft": "QLoRA rows: cut the source (BOS + input) to N tokens (default "
                                       "%(default)s, QLoRA's)"}, 1024, type=positive_int, metavar="N")
    target_max_len: int = flag({"sft": "QLoRA rows: cut the target (output + EOS) to N tokens (default "
                                       "%(default)s, QLoRA's)"}, 256, type=positive_int, metavar="N")
    train_on_source: bool = flag({"sft": "QLoRA rows: learn the input too"}, False, action="store_true")
    dist: object = field(default=None, repr=False)  # this process among torchrun's (setup_distributed)

    def resolve(self, demo: bool) -> "TrainConfig":
        """Fill what is None from the recipe (the tiny demo's without --model); device and dtype,
        resolved here once; where the data comes from and the outputs go."""
        family = ("demo-" if demo else "") + ("full" if self.method == "full" else "lora")
        for k, v in RECIPES[(self.command, family)].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.lora_dropout is None:  # DPO turns dropout off so that policy == reference at step 0 (as TRL)
            self.lora_dropout = 0.0 if self.command == "dpo" else 0.1
        self.device, self.dtype = cli.device_and_dtype(self.device, self.dtype)
        kind = "sft" if self.command == "sft" else "prefs"
        self.data = self.data or os.path.join(DATA, f"{kind}_train.jsonl")
        out = runs.resume_root(self) if self.resume else os.path.join("out", f"{self.command}-{self.method}")
        self.output = self.output or out  # --resume: continue in the folder being resumed
        return self


def training_flags(p, command):
    """The flags of `sft` or `dpo`, one per TrainConfig field that the command has; a recipe's
    default shows for full fine-tuning, lora/qlora and the tiny demo, each with its source."""
    full = RECIPES[(command, "full")]
    for f in fields(TrainConfig):
        help, recipe = f.metadata.get("help"), f.metadata.get("recipe")
        help = help.get(command) if isinstance(help, dict) else help
        if recipe:
            r = {k: RECIPES[(command, k)][f.name] for k in ("full", "lora", "demo-lora", "demo-full")}
            with_full = f", {r['demo-full']} with full" if r["demo-full"] != r["demo-lora"] else ""
            help = (f"{help.format(batch=full['batch_size'] * full['grad_accum'])} (default {r['full']} for "
                    f"full fine-tuning [{SOURCES[(command, 'full')]}], {r['lora']} with lora/qlora "
                    f"[{SOURCES[(command, 'lora')] if recipe is True else recipe}]; {r['demo-lora']} for the "
                    f"tiny demo{with_full})")
        if help is not None:
            p.add_argument("--" + f.name.replace("_", "-"), default=f.default,
                           help=help.replace("{command}", command), **f.metadata["kw"])


# -----------------------------------------------------------------------------
# The model that trains, and its optimiser


def build_policy(cfg, path):
    """The model to train, as --method says. full: every weight, in float32 whatever the compute
    dtype, as open-instruct and transformers' Trainer (a bf16 weight near 0.02 cannot move by less
    than ~6e-5: at Tulu 2's lr of 2e-5 most would never change); lora: LoRA adapters on a frozen
    base in the compute dtype; qlora: an NF4 base, LoRA on top, paged AdamW (QLoRA Sec. 3)."""
    from lora import add_lora, load_adapter
    fsdp = dist.uses_fsdp(cfg.method, cfg.fsdp, dist.dist_of(cfg).world)  # empty, sharded, then read
    model = (dist.empty_model if fsdp else llama.load_model)(
        path, dtype=torch.float32 if cfg.method == "full" else cfg.dtype, device=cfg.device,
        quantize="nf4" if cfg.method == "qlora" else None)
    if cfg.method == "full":
        if cfg.adapter:
            raise TuluError("--adapter needs --method lora or qlora (merge it first for full fine-tuning)")
        model.requires_grad_(True)
    elif cfg.adapter:
        load_adapter(model, cfg.adapter, trainable=True, dropout=cfg.lora_dropout)
    else:
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    fast.use_fast_dropout(model)  # LoRA's nn.Dropout, drawn from a quarter of the random numbers
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.compile:
        fast.compile_layers(model)
    return dist.shard(model, dist.dist_of(cfg), cfg.dtype, path) if fsdp else model


def build_optimizer(cfg, model):
    from nf4 import PagedAdamW
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.method == "qlora" and not dist.is_sharded(model):  # sharded, AdamW's state is 1/N a rank already
        return PagedAdamW(params, **kw)
    # one fused kernel per update (2.3x the per-tensor loop on 2 cores), as Trainer's adamw_torch_fused
    return torch.optim.AdamW(params, fused=True, **kw)


# -----------------------------------------------------------------------------
# What one training example contributes: SFT (here) and DPO (dpo.py)


class SFTTask:
    """Next-token cross-entropy on the learned (label != -100) tokens. Gradient accumulation
    divides the *sum* of token losses by the learned tokens of the whole optimiser step, so every
    token weighs the same however the step is split (open-instruct's reduce_loss="sum")."""

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
    """DPO on (chosen, rejected) pairs: both answers in one forward pass, the loss summed over
    pairs and divided by the pairs in the optimiser step. Reference log-probs ride along with
    each pair where cache_reference computed them before the first update; otherwise (LoRA)
    they come from the same model with its adapters off: one model in memory either way."""

    def __init__(self, cfg, pad_id):
        self.cfg, self.pad_id, self.avg = cfg, pad_id, dpo.uses_average(cfg.loss)

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
        losses, cr, rj = dpo.dpo_loss(pc, pr, rc, rr, self.cfg.beta, self.cfg.loss, self.cfg.label_smoothing)
        return losses.sum() / denom, dpo.dpo_metrics(losses, cr, rj, pc, pr, reduction="sum")


@torch.no_grad()
def cache_reference(model, pairs, task, cfg):
    """Append the reference log-probs (rc, rr) to every pair, from the model as it is now, before
    the first update (open-instruct's dpo_tune_cache): no second copy of the model in memory."""
    d, scores = dist.dist_of(cfg), []  # under torchrun each rank scores its share of the batches (deal)
    for chunk, batch in cli.eval_batches(model, pairs, task, cfg, "reference log-probs", d):
        with cli.autocast(cfg):
            rc, rr = dpo.concatenated_logps(model, batch, task.avg)
        scores.append([(float(c), float(r)) for c, r in zip(rc, rr)])
    scores = [s for batch in dist.undeal(scores, math.ceil(len(pairs) / cfg.batch_size), d) for s in batch]
    return [p[:4] + s for p, s in zip(pairs, scores)]


# -----------------------------------------------------------------------------
# The training loop, shared by sft and dpo


def linear_schedule(step, warmup_steps, total_steps):
    """LR multiplier: 0 -> 1 linearly over the warmup steps, then 1 -> 0 linearly at
    the last step (HF's get_linear_schedule_with_warmup, used by open-instruct)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def step_batches(n, step, steps_per_epoch, batch_size, grad_accum, seed, lengths=None):
    """Example indices of each micro-batch of optimiser step `step`. Epoch e's order is a
    permutation seeded by seed + e, so a resumed run sees the same data. With `lengths`,
    the step's examples are cut into micro-batches longest first, so that little is padded:
    the same examples, so the same summed gradient (the loss is divided once a step)."""
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    E = batch_size * grad_accum
    chunk = order[i * E:(i + 1) * E]
    if lengths is not None:
        chunk.sort(key=lambda j: -lengths[j])  # stable: equal lengths keep the permutation's order
    return [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]


def train(cfg, model, examples, task, out, template=None):
    """Tulu 2's loop: AdamW (paged for QLoRA), linear warmup and decay, gradient accumulation
    that sums the token losses of the whole step and divides once by its learned tokens
    (open-instruct's reduce_loss="sum": every token weighs the same however the step is split),
    clipping. The rest (metrics, checkpoints, signals, the non-finite stop) is run's, once a step.
    template: the outputs' chat template; with one, the adapter or model is written to `out` at
    the end. Returns the metrics' rows."""
    d = dist.dist_of(cfg)
    per_epoch = math.ceil(len(examples) / (cfg.batch_size * cfg.grad_accum * d.world))  # the global batch
    total = cfg.max_steps or cfg.epochs * per_epoch
    warmup = int(total * cfg.warmup_ratio)
    lengths = data.example_lengths(examples) if cfg.group_by_length else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, model)
    os.makedirs(out, exist_ok=True)
    run = runs.Run(cfg, out, total, per_epoch)
    run.resume(model, opt)
    net = dist.data_parallel(cfg, model)
    model.train()
    with run:
        for step in run.steps():
            lr = cfg.lr * (1.0 if cfg.lr_scheduler == "constant" else linear_schedule(step, warmup, total))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = step_batches(len(examples), step, per_epoch, cfg.batch_size, cfg.grad_accum * d.world,
                               cfg.seed, lengths)  # one process's micro-batches with the same global batch
            micro = [task.collate([examples[i] for i in c]) for c in dist.deal(idx, d)]  # this rank's share
            denom = max(1, dist.all_sum(d, sum(task.count(b) for b in micro))[0])
            for i, b in enumerate(micro):
                with cli.autocast(cfg), dist.grad_sync(net, last=i == len(micro) - 1):
                    loss, metrics = task.loss(net, cli.on(b, cfg.device), denom)
                (loss * d.world).backward()  # DDP and FSDP average over ranks: the recipe sums
                run.add(loss, metrics, b)
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf  # 0: no clipping
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            if run.finite(norm, denom):  # the whole step's loss and gradient norm: every rank alike
                opt.step()
            opt.zero_grad(set_to_none=True)
            run.end_step(step + 1, model, opt, lr)
        save = template and functools.partial(outputs.save_outputs, cfg, model, cfg.model, out, template)
        return run.finish(model, save)


# -----------------------------------------------------------------------------
# The command line: sft and dpo, then the commands that use the recipe (their plumbing in
# machinery/cli.py), then the parser. Without --model, the tiny demo's model and recipe.


def tiny_default() -> str:
    """The demo's base model, where sft starts without --model: built once (machinery/demo.py)."""
    return demo.tiny_default_model(cli.cache_dir(), chat_text, train, SFTTask, TrainConfig)


def tiny_sft() -> str:
    """Where dpo, chat and eval start without --model: the tiny default after the demo's full SFT,
    run once and cached beside it."""
    path = tiny_default().replace("tiny-llama-", "tiny-sft-")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"DPO starts from an SFT model: running the demo SFT once (cached in {path})")
        tmp = f"{path}.tmp{os.getpid()}"
        main(["sft", "--method", "full", "--output", tmp])
        os.replace(tmp, path)
    return path


def start_run(args):
    """What sft and dpo do before training: the run's TrainConfig, printed; the checks that
    fail early, before the model loads; the tokenizer, the examples and the model to train."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    d = cfg.dist = dist.setup_distributed(cfg.resolve(args.model is None).device)  # torchrun's, if any
    cfg.model = cfg.model or dist.rank0_first(d, tiny_sft if cfg.command == "dpo" else tiny_default)
    cli.print_config(cfg, fields(cfg))
    dist.together(d, llama.checkpoint_files, cfg.model)  # a missing or unusable folder: say so first
    print(dist.together(d, plan.run_line, cfg))  # each device's peak memory (a 4-bit folder: no full, --fsdp)
    checks.check_output(cfg.output, cfg.model, cfg.adapter)
    dist.together(d, runs.check_resume, cfg)  # before the model loads
    torch.manual_seed(cfg.seed)
    tok = dist.together(d, cli.tokenizer, cfg.model)
    sft = cfg.command == "sft"
    rows = {k: getattr(cfg, k) for k in ("source_max_len", "target_max_len", "train_on_source")}
    load = functools.partial(load_sft_data, rows=rows) if sft else load_pref_data
    examples = dist.rank0_first(d, load, cfg.data, tok, cfg.max_seq_length, cfg.num_workers,
                                os.path.join(cli.cache_dir(), "data"))
    checks.check_batch_size(cfg, examples, "conversation" if sft else "preference pair")
    checks.warn_beyond_context(cfg, examples)
    return cfg, args.model is None, tok, examples, dist.together(d, build_policy, cfg, cfg.model)


def demo_answers(model, tok, model_dir):
    """The model's greedy answers to the demo's first 40 held-out prompts."""
    prompts = evaluate.answer_prompts(data.read_jsonl(demo.DEMO_HELDOUT, "sft"), 40)
    ids, stop = [encode_prompt(p, tok) for p, _ in prompts], outputs.stop_ids(model_dir, tok)
    return prompts, evaluate.greedy_answers(model, tok, ids, stop, show=dist.rank0())


def cmd_sft(args):
    cfg, is_demo, tok, examples, model = start_run(args)
    rows = data.row_keys(next(data.read_objects(cfg.data))[1])  # QLoRA's rows: their chat format
    template = chat_template(tok, "qlora" if rows else "tulu")
    train(cfg, model, examples, SFTTask(tok.eos_id), cfg.output, template)
    if is_demo:
        prompts, answers = demo_answers(model, tok, cfg.model)
        demo.print_answers(demo.DEMO_HELDOUT, prompts, {"SFT": answers})


def cmd_dpo(args):
    cfg, is_demo, tok, pairs, model = start_run(args)
    task = DPOTask(cfg, pad_id=tok.eos_id)
    # The reference is the model as it starts: for full fine-tuning the SFT weights, with --adapter base
    # + SFT adapter (switching the training adapter off would give the bare base, the wrong reference).
    # Score every pair once now; no second model is ever held in memory.
    cached = cfg.method == "full" or bool(cfg.adapter)
    reference = (lambda pairs: cache_reference(model, pairs, task, cfg)) if cached else (lambda pairs: pairs)
    pairs, heldout = reference(pairs), os.path.join(DATA, "prefs_heldout.jsonl")
    if is_demo:  # held-out numbers at step 0, where the policy is the SFT model
        held = reference(load_pref_data(heldout, tok, cfg.max_seq_length))
        before = evaluate.held_out_metrics(model, held, task, cfg, cli.eval_batches, cli.autocast)
        prompts, sft_answers = demo_answers(model, tok, cfg.model)
    train(cfg, model, pairs, task, cfg.output, chat_template(tok))
    if is_demo:
        dpo_answers = demo_answers(model, tok, cfg.model)[1]
        demo.print_answers(demo.DEMO_HELDOUT, prompts, {"SFT": sft_answers, "DPO": dpo_answers})
        after = evaluate.held_out_metrics(model, held, task, cfg, cli.eval_batches, cli.autocast)
        print(f"held-out pairs ({heldout}): rewards/accuracy {before['rewards/accuracy']:.2f} -> "
              f"{after['rewards/accuracy']:.2f}, rewards/margin {before['rewards/margin']:.3f} -> "
              f"{after['rewards/margin']:.3f} (at step 0 the policy is the reference: every reward is 0)")


def cmd_eval(args):
    """Held-out loss, DPO's rewards or multiple-choice accuracy, by this file's tasks (machinery/cli.py)."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    cfg.device, cfg.dtype = cli.device_and_dtype(cfg.device, cfg.dtype)
    cfg.model = cfg.model or tiny_sft()
    tasks = lambda eos: {"sft": SFTTask(eos), "prefs": DPOTask(cfg, eos), "choice": SFTTask(eos)}
    # --chat-format qlora: a conversation is scored as QLoRA scored oasst1, its QLoRA text a {"text"} row
    as_row = (lambda o: {"text": qlora_text(o["messages"])}) if args.chat_format == "qlora" else None
    cli.evaluate_model(args, cfg, tasks, CHAT._replace(row=encode_instruction), cache_reference, as_row)


def build_parser():
    ap = argparse.ArgumentParser(prog="tulu.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    commands = {"sft": (cmd_sft, lambda p: training_flags(p, "sft"),
                        "supervised fine-tuning on Tulu-format conversations"),
                "dpo": (cmd_dpo, lambda p: training_flags(p, "dpo"),
                        "direct preference optimisation on chosen/rejected pairs"),
                "merge": (lambda args: cli.merge(args, chat_template), cli.merge_flags,
                          "fold a LoRA adapter into its base and write an HF folder"),
                "quantize": (quantize.command, quantize.flags,
                             "write a model as a bitsandbytes 4-bit folder (NF4, double quantization)"),
                "chat": (lambda args: cli.chat(args, tiny_sft, encode_prompt, CHAT_HEADERS[args.chat_format]),
                         cli.chat_flags, "talk to a model in the Tulu chat format"),
                "eval": (cmd_eval, cli.eval_flags,
                         "held-out loss, preference accuracy or multiple-choice (MMLU-style) accuracy"),
                "plan": (plan.print_plan, plan.plan_flags,
                         "each device's peak memory in a training run, from config.json alone"),
                "exercises": (exercises.command, exercises.flags, "write a student copy in which key "
                              "functions are left to implement, graded by the tests (see its EXERCISES.md)")}
    for name, (func, flags, help) in commands.items():
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=func)
        flags(p)
    return ap


def main(argv=None):
    cli.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
