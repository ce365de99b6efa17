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
import contextlib
import datetime
import functools
import gc
import array
import bisect
import hashlib
import html
import itertools
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

import dpo
import llama
from llama import TuluError, Tokenizer, load_model, save_model, atomic_write, write_json
from machinery.demo import DEMO_HELDOUT, print_answers, tiny_default_model, tiny_sft_model
from machinery.evaluate import (answer_prompts, check_eval_args, choice_metrics, choice_scores, data_kind,
                                greedy_answers, preference_metrics, read_choices, report, sft_metrics)
from machinery.exercises import EXERCISES, make_exercises
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

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
        text += ROLE_HEADERS[m["role"]] + m["content"].strip() + (eos if m["role"] == "assistant" else "") + "\n"
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
        header = ROLE_HEADERS["assistant"] if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant" else ""
        end = prefix_len(chat_text(messages[:i + 1], eos) + header)
        labels[start:end] = [-100] * len(labels[start:end])
        if end >= max_seq_length:
            break
    return ids, labels
    # end exercise


class Prefixes:
    """tokenizer.encode(text[:b], bos=True)[:limit] for any b, from one pass over
    tokenizer.spans(text). The tokenizer cuts a text at its special tokens and encodes
    each piece between them on its own, so the ids of text[:b] are those of the
    spans that end by b, then those of the piece of text that b cuts, encoded alone.
    Spans are encoded when first needed, none past `limit` tokens."""

    def __init__(self, tokenizer, text: str, limit: int):
        self.tok, self.text, self.limit, self.spans = tokenizer, text, limit, tokenizer.spans(text)
        self.ids = tokenizer.encode("", bos=True)  # BOS (or nothing), then each span's ids
        self.seen = [(0, len(self.ids), True)]  # (end, len(self.ids) after it, special?) of BOS and each span

    def cut(self, b: int) -> tuple[int, list[int]]:
        """(n, tail): tokenizer.encode(text[:b], bos=True) is self.ids[:n] + tail, as
        far as `limit` tokens."""
        while self.seen[-1][0] < b and len(self.ids) < self.limit:
            _, end, ids, special = next(self.spans)
            self.ids += ids
            self.seen.append((end, len(self.ids), special))
        k = bisect.bisect_left(self.seen, b, key=lambda s: s[0])  # the span that holds text[b - 1]
        if k == len(self.seen):  # the spans before b make `limit` tokens already
            return self.seen[-1][1], []
        (start, before, _), (end, after, special) = self.seen[k - 1] if k else (0, 0, True), self.seen[k]
        if end == b:
            return after, []
        if special:  # b inside a special token: no shortcut (never in a chat text)
            return 0, self.tok.encode(self.text[:b], bos=True)
        return before, self.tok.encode_piece(self.text[start:b], start == 0)

    def length(self, b: int) -> int:
        n, tail = self.cut(b)
        return min(n + len(tail), self.limit)


def encode_messages_fast(messages, tokenizer, max_seq_length: int) -> tuple[list[int], list[int]]:
    """encode_messages, the same ids and labels, without encoding the conversation
    again up to the end of each turn: Prefixes reads every prefix's length off one
    encoding. Each answer ends with the EOS token, a special token, so a prefix
    re-encodes at most the turns since the last answer; nothing past max_seq_length
    is encoded."""
    if not messages:
        raise ValueError("no messages")
    turns = [chat_text([m], eos_text(tokenizer)) for m in messages]
    text, at = "".join(turns), [0, *itertools.accumulate(map(len, turns))]  # at[i]: where turn i starts
    prefix = Prefixes(tokenizer, text, max_seq_length)
    n, tail = prefix.cut(len(text.rstrip()))  # text.strip(): it begins with a role header
    ids = (prefix.ids[:n] + tail)[:max_seq_length]
    labels = list(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if i == 0 else prefix.length(at[i])
        header = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"  # "<|assistant|>\n" masked too
        end = prefix.length(at[i + 1] + header * len(ROLE_HEADERS["assistant"]))
        labels[start:end] = [-100] * len(labels[start:end])
        if end >= max_seq_length:
            break
    return ids, labels


def encode_prompt(messages, tokenizer) -> list[int]:
    """Ids of a conversation ending with a user turn, then "<|assistant|>\n", for
    the model to write the answer: tokenized exactly as in training. (open-instruct's
    evaluation writes "<s>" into the prompt text instead, which with legacy=False
    encodes the first "<|user|>" without "▁", unlike training.)"""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user turn")
    return tokenizer.encode(chat_text(messages, eos_text(tokenizer)) + ROLE_HEADERS["assistant"], bos=True)


KIND_KEYS = {"sft": ("messages",), "prefs": ("chosen", "rejected")}


def message_problem(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "must be a non-empty list of messages"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {j} must be an object with string 'role' and 'content'"
        if m["role"] not in ROLE_HEADERS:
            return f"message {j}: unknown role {m['role']!r} (expected system, user or assistant)"
    return None


def parse_json_line(path: str, n: int, raw: bytes):
    """The JSON object on line n of a file, None for a blank line. Problems:
    TuluError("path:n: ...")."""
    try:
        line = raw.decode("utf-8").strip()
        obj = json.loads(line) if line else None
    except UnicodeDecodeError:
        raise TuluError(f"{path}:{n}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise TuluError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if line and not isinstance(obj, dict):
        raise TuluError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_line(path: str, n: int, raw: bytes, kind: str):
    """The object on line n of a JSONL file of kind "sft" ({"messages": [...]}) or
    "prefs" ({"chosen": [...], "rejected": [...]}), None for a blank line; other keys
    (dataset, id) are ignored. Problems: TuluError("path:n: ...")."""
    obj = parse_json_line(path, n, raw)
    if obj is None:
        return None
    check_kind(path, n, obj, kind)
    for key in KIND_KEYS[kind]:
        problem = f"missing key {key!r}" if key not in obj else message_problem(obj[key])
        if problem:
            raise TuluError(f"{path}:{n}: {problem if key not in obj else repr(key) + ' ' + problem}")
    return obj


def read_objects(path: str, parse=parse_json_line):
    """Yield (line_number, object) for each non-blank line of a JSONL file."""
    if not os.path.isfile(path):
        raise TuluError(f"{path}: no such file")
    seen = False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            obj = parse(path, n, raw)
            if obj is not None:
                seen = True
                yield n, obj
    if not seen:
        raise TuluError(f"{path}: empty")


def read_jsonl(path: str, kind: str):
    """Yield (line_number, object) for each conversation or pair of a JSONL file (parse_line)."""
    return read_objects(path, functools.partial(parse_line, kind=kind))


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


def encode_example(obj, kind, tok, max_seq_length):
    """One line's object -> its example: (ids, labels), or (chosen ids, chosen labels,
    rejected ids, rejected labels); None if nothing is left to learn after truncation
    (open-instruct drops those too). A problem: ValueError."""
    if kind == "sft":
        ids, labels = encode_messages_fast(obj["messages"], tok, max_seq_length)
        return (ids, labels) if any(label != -100 for label in labels[1:]) else None
    problem = dpo.check_pair(obj["chosen"], obj["rejected"])
    if problem:
        raise ValueError(problem)
    return encode_pair(obj["chosen"], obj["rejected"], tok, max_seq_length, encode_messages_fast)


def load_sft_data(path, tok, max_seq_length, workers=1, cache=None):
    """Every conversation of a JSONL file as (ids, labels), in order, held flat
    (Examples); conversations with nothing to learn are dropped and counted. workers,
    cache: see load_examples."""
    return load_examples(path, "sft", tok, max_seq_length, workers, cache)


def load_pref_data(path, tok, max_seq_length, workers=1, cache=None):
    """Every preference pair as (chosen ids, chosen labels, rejected ids, rejected labels)."""
    return load_examples(path, "prefs", tok, max_seq_length, workers, cache)


# -----------------------------------------------------------------------------
# A data set at scale: flat examples, worker processes, a cache of the encoding
#
# The Tulu v2 SFT mixture is ~326k conversations and hundreds of millions of
# tokens. Encoded examples are held as one flat int32 tensor (8 bytes a token
# with its label, where two lists of Python ints take about 43), encoded by worker
# processes, each a batch of whole lines of the file at a time, and kept in a
# cache keyed by everything they depend on, so the next run, and every
# --resume, reads them back instead of encoding again.


class Examples:
    """Encoded examples, each `width` int32 sequences (sft: ids, labels; prefs:
    chosen ids, chosen labels, rejected ids, rejected labels) laid end to end in
    `tokens`; sequence j is tokens[offsets[j]:offsets[j + 1]]. examples[i] is the
    tuple of those views (no copy), examples[a:b] a list of them: what the training
    loop and the collate functions read."""

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor, width: int):
        self.tokens, self.offsets, self.width = tokens, offsets, width

    @classmethod
    def join(cls, batches, width: int) -> "Examples":
        """From BatchEncoder's results: (tokens, sequence lengths, ...) as int32 bytes."""
        tokens = np.concatenate([np.frombuffer(b[0], np.int32) for b in batches] or [np.zeros(0, np.int32)])
        lengths = np.concatenate([np.frombuffer(b[1], np.int32) for b in batches] or [np.zeros(0, np.int32)])
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(torch.from_numpy(tokens), torch.from_numpy(offsets), width)

    def __len__(self):
        return (len(self.offsets) - 1) // self.width

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        first = (i % len(self)) * self.width
        o = self.offsets[first:first + self.width + 1].tolist()
        return tuple(self.tokens[a:b] for a, b in zip(o, o[1:]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def tolist(self):
        """The examples as tuples of lists of ints (tests compare them with encode_messages)."""
        return [tuple(s.tolist() for s in e) for e in self]

    def nbytes(self) -> int:
        return self.tokens.nbytes + self.offsets.nbytes


def scan_file(path: str, batch_bytes: int):
    """One pass over a data file: (its sha256, [(offset, size, first line number)] of
    batches of whole lines of about batch_bytes, its number of lines)."""
    h, batches, offset, line, pending = hashlib.sha256(), [], 0, 1, b""
    with open(path, "rb") as f:
        while block := f.read(batch_bytes):
            h.update(block)
            pending += block
            cut = pending.rfind(b"\n") + 1
            if cut:
                batches.append((offset, cut, line))
                line, offset, pending = line + pending.count(b"\n", 0, cut), offset + cut, pending[cut:]
    if pending:
        batches.append((offset, len(pending), line))
    return h.hexdigest(), batches, line - 1 + bool(pending)


BATCH_BYTES = 1 << 20  # of the data file a worker encodes at a time


class BatchEncoder:
    """What a worker process runs: one batch of lines of the file -> (the tokens of
    its examples' sequences end to end, as int32 bytes; their lengths, as int32
    bytes; the number of non-blank lines read). A problem raises TuluError naming
    the file and line, which the pool hands back to the parent."""

    def __init__(self, path, kind, tok, max_seq_length):
        self.path, self.kind, self.tok, self.max_seq_length = path, kind, tok, max_seq_length

    def __call__(self, batch):
        offset, size, first_line = batch
        with open(self.path, "rb") as f:
            f.seek(offset)
            lines = f.read(size).split(b"\n")
        tokens, lengths, read = array.array("i"), array.array("i"), 0
        for n, raw in enumerate(lines, start=first_line):
            obj = parse_line(self.path, n, raw, self.kind)
            if obj is None:
                continue
            read += 1
            try:
                example = encode_example(obj, self.kind, self.tok, self.max_seq_length)
            except ValueError as e:
                raise TuluError(f"{self.path}:{n}: {e}") from None
            for seq in example or ():
                tokens.extend(seq)
                lengths.append(len(seq))
        return tokens.tobytes(), lengths.tobytes(), read


_encoder = None  # the BatchEncoder of a worker process (a fork of the parent: nothing is pickled)


def _set_encoder(encoder):
    global _encoder
    _encoder = encoder


def _run_encoder(batch):
    return _encoder(batch)


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 8)


def encode_file(path, kind, tok, max_seq_length, batches, lines, workers):
    """(Examples, non-blank lines read): every batch encoded, by `workers` forked
    processes (one: this process), the results in file order whatever the number."""
    import multiprocessing
    encoder = BatchEncoder(path, kind, tok, max_seq_length)
    if "fork" not in multiprocessing.get_all_start_methods() or len(batches) < 2:
        workers = 1  # a spawned worker would import torch and rebuild the tokenizer: not worth it
    bar = tqdm(total=lines, unit=" conv" if kind == "sft" else " pair", leave=False, dynamic_ncols=True,
               desc=f"encoding {os.path.basename(path)}")
    results, tokens, t0 = [], 0, time.perf_counter()
    pool = None
    try:
        # the first batch here: forked workers inherit a word cache (BPE) that already knows the common words
        first = [encoder(batches[0])] if workers > 1 and batches else []
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(workers, _set_encoder, (encoder,))
        rest = batches[len(first):]
        done = itertools.chain(first, pool.imap(_run_encoder, rest) if pool else map(encoder, rest))
        for r, next_first in zip(done, [b[2] for b in batches[1:]] + [lines + 1]):
            results.append(r)
            tokens += len(r[0]) // 8  # ids and labels, 4 bytes each
            bar.update(next_first - 1 - bar.n)
            speed = tokens / max(time.perf_counter() - t0, 1e-6)
            bar.set_postfix_str(f"{speed:,.0f} tokens/s", refresh=False)
    finally:
        if pool:
            pool.terminate()
        bar.close()
    return Examples.join(results, width=2 * len(KIND_KEYS[kind])), sum(r[2] for r in results)


def data_cache_file(folder, path, digest, kind, tok, max_seq_length) -> tuple[str, str]:
    """(file, key) of the cached encoding of a data file: the key hashes everything
    the examples depend on -- the file's sha256, sft or prefs, --max-seq-length, the
    tokenizer's files and settings, and the code that encodes (llama.py, tulu.py,
    the sentencepiece and Unicode versions) -- so a change to any of them misses."""
    import sentencepiece
    import unicodedata
    settings = [digest, kind, max_seq_length, type(tok).__name__, getattr(tok, "legacy", None),
                sentencepiece.__version__, unicodedata.unidata_version]
    h = hashlib.sha256(json.dumps(settings).encode())
    for f in (tok.file, os.path.join(tok.dir, "tokenizer_config.json"), llama.__file__, __file__):
        h.update(pathlib.Path(f).read_bytes() if os.path.exists(f) else b"-")
    key = h.hexdigest()
    return os.path.join(folder, f"{os.path.basename(path)}.{kind}.{key[:20]}.safetensors"), key


def load_examples(path, kind, tok, max_seq_length, workers=1, cache=None) -> Examples:
    """The examples of a data file of `kind` ("sft" or "prefs"), encoded by `workers`
    processes, or read back from the folder `cache` (None: no cache) when encoded
    before with the same everything (data_cache_file); written there otherwise.
    Under torchrun, call it on rank 0 first and on the other ranks after a barrier:
    they find the examples cached instead of each encoding the whole file."""
    if not os.path.isfile(path):
        raise TuluError(f"{path}: no such file")
    digest, batches, lines = scan_file(path, BATCH_BYTES)
    file, key = data_cache_file(cache, path, digest, kind, tok, max_seq_length) if cache else (None, None)
    found = read_cache(file, key) if file else None
    examples, read = found or encode_file(path, kind, tok, max_seq_length, batches, lines, workers)
    if not read:
        raise TuluError(f"{path}: empty")
    what, why = ("conversations", "nothing left to learn") if kind == "sft" else ("preference pairs",
                                                                                 "answer truncated away")
    dropped = f" ({read - len(examples)} dropped: {why})" if read > len(examples) else ""
    print(f"{path}: {len(examples)} {what}{dropped}" + (f", encoded before ({file})" if found else ""))
    if not len(examples) and kind == "sft":
        raise TuluError(f"{path}: no conversation with an assistant turn to learn from")
    if not len(examples):
        raise TuluError(f"{path}: no pair left: every answer is truncated away at --max-seq-length {max_seq_length}")
    if file and not found:
        write_cache(file, key, examples, read)
    return examples


def read_cache(file, key):
    """(Examples, lines read) from a cache file written by write_cache, or None."""
    from safetensors import SafetensorError, safe_open
    if not os.path.exists(file):
        return None
    try:
        with safe_open(file, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            t = {k: f.get_tensor(k) for k in ("tokens", "offsets")}
    except (SafetensorError, OSError, ValueError):
        return None  # unreadable: encode again, and write it anew
    return Examples(t["tokens"], t["offsets"], int(meta["width"])), int(meta["read"])


def write_cache(file, key, examples, read):
    """Write the examples to the cache, atomically; a cache that cannot be written
    (read-only, full) only costs the next run the encoding."""
    from safetensors.torch import save_file
    meta = {"key": key, "width": str(examples.width), "read": str(read)}
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        tensors = {"tokens": examples.tokens, "offsets": examples.offsets}
        atomic_write(file, lambda tmp: save_file(tensors, tmp, meta))
    except OSError as e:
        print(f"tulu: could not cache the encoded data in {file} ({e.strerror or e})", file=sys.stderr)


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


def build_policy(args, path):
    """Load the model for training as --method says. full: every weight trains
    (AdamW); lora: a frozen base + LoRA adapters; qlora: the base quantised to
    NF4 while loading, LoRA adapters on top, and paged AdamW (QLoRA Sec. 3)."""
    from lora import add_lora, load_adapter
    fsdp = args.method == "full" and dist_of(args).world > 1  # read to the CPU, then shard to the device
    model = load_model(path, dtype=storage_dtype(args), device="cpu" if fsdp else args.device,
                       quantize="nf4" if args.method == "qlora" else None)
    if args.method == "full":
        if getattr(args, "adapter", None):
            raise TuluError("--adapter needs --method lora or qlora (merge it first for full fine-tuning)")
        model.requires_grad_(True)
    elif getattr(args, "adapter", None):
        load_adapter(model, args.adapter, trainable=True, dropout=args.lora_dropout)
    else:
        add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    model.gradient_checkpointing = args.gradient_checkpointing
    if getattr(args, "compile", False):
        compile_layers(model)
    return shard(model, dist_of(args), args.dtype) if fsdp else model


def compile_layers(model):
    """--compile: torch.compile each decoder layer in place (state_dict keys unchanged).
    The layers are alike, so they share the compiled code: inductor fuses the
    elementwise work around the matrix products (norms, rotary, SiLU, LoRA's casts and
    adds, NF4's dequantization) into generated kernels. The first step pays for the
    compilation (tens of seconds); a change of shape (another sequence length) compiles
    again, up to torch._dynamo's recompile limit, then runs the plain layer."""
    for layer in model.model.layers:
        layer.compile()


def build_optimizer(args, model):
    from nf4 import PagedAdamW
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps, weight_decay=args.weight_decay)
    if args.method == "qlora":
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


def eval_batches(model, examples, task, args, desc, d=None):
    """(examples, device batch) in order, the model in eval mode (no dropout); under
    torchrun (d), this rank's share (deal), the first batch standing in where short."""
    model.eval()
    chunks = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    for chunk in tqdm(deal(chunks, d or SINGLE), desc=desc, leave=False):
        yield chunk, {k: v.to(args.device) for k, v in task.collate(chunk or chunks[0]).items()}


def autocast(args):
    """bf16 autocast when --dtype is bf16 (QLoRA's bf16 compute), on the CPU too, so that
    a CPU run does the arithmetic a GPU run does: matrix products in bf16, float32
    master weights cast for each one, reductions (softmax, norms) in float32."""
    device_type = torch.device(args.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.dtype == torch.bfloat16)

# -----------------------------------------------------------------------------
# Failing loudly and early: mistakes that would otherwise cost a GPU-day


def check_kind(path, n, obj, kind):
    """A preference file given to sft, or an SFT file to dpo: say which command it is for."""
    other = "prefs" if kind == "sft" else "sft"
    if not any(k in obj for k in KIND_KEYS[kind]) and all(k in obj for k in KIND_KEYS[other]):
        keys = lambda kind: " and ".join(map(repr, KIND_KEYS[kind]))
        command = {"sft": ("sft", "a conversation"), "prefs": ("dpo", "a preference pair")}
        raise TuluError(f"{path}:{n}: {command[other][1]} ({keys(other)}): this file is for "
                        f"`tulu.py {command[other][0]}` ({command[kind][0]} reads {keys(kind)})")


def check_vocab(tok, model_dir):
    """Every id the tokenizer can produce needs a row of the embedding (config.json's
    vocab_size, which load_model holds the weights to); otherwise training ends deep in
    F.embedding with "index out of range". More rows than ids (padded vocabularies) is fine."""
    if tok is None:
        return None
    config = os.path.join(model_dir, "config.json")
    rows = llama.LlamaConfig.from_json(config).vocab_size
    if tok.vocab_size > rows:
        raise TuluError(f"{tok.file}: the tokenizer has {tok.vocab_size} ids "
                        f"but the model's embedding has {rows} rows (vocab_size in {config}); a tokenizer of "
                        f"another model, or tokens added without resizing the embedding?")
    return tok


def tokenizer_source(adapter, model_dir):
    """The folder whose tokenizer a run uses: the adapter's when it has one (sft and
    dpo write the tokenizer beside the adapter), else the model's."""
    if adapter and any(os.path.exists(os.path.join(adapter, n)) for n in ("tokenizer.model", "tokenizer.json")):
        return adapter
    return model_dir


def folder_tokenizer(adapter, model_dir):
    """The tokenizer a merge copies (the adapter's, else its base's), or None where there
    is none or tulu cannot read it: merge only copies it."""
    try:
        return Tokenizer(tokenizer_source(adapter, model_dir))
    except TuluError:
        return None


def check_output(output, model, adapter=None):
    """Refuse an --output that is the folder read from: it would be written over."""
    for flag, src in (("--model", model), ("--adapter", adapter)):
        if src and os.path.realpath(output) == os.path.realpath(src):
            raise TuluError(f"--output {output} is the {flag} folder: writing there would overwrite what "
                            f"this run reads; choose another --output")


def check_batch_size(args, examples, what):
    n = len(examples)
    if args.batch_size > n:
        raise TuluError(f"--batch-size {args.batch_size} is larger than the data set ({n} {what}{'s' * (n != 1)} "
                        f"in {args.data}): use --batch-size {n} or fewer, or more data")


def warn_beyond_context(args, examples):
    """Like transformers, warn (not stop) when an example is longer than the model's
    context: RoPE still runs past max_position_embeddings, but quality usually drops."""
    config = os.path.join(args.model, "config.json")
    ctx = llama.LlamaConfig.from_json(config).max_position_embeddings
    longest = max(len(x) for e in examples for x in e[:4:2])  # (ids, labels) or (c_ids, c_labels, r_ids, ...)
    if longest > ctx:
        print(f"tulu {args.command}: warning: examples of up to {longest} tokens (--max-seq-length "
              f"{args.max_seq_length}) are longer than the model's context (max_position_embeddings {ctx} "
              f"in {config}); positions beyond it were never trained", file=sys.stderr)


def json_safe(row):
    """NaN and ±inf are not JSON (json.dumps writes a bare NaN that jq, JavaScript and
    most dashboards reject): write null, and name what was non-finite under "nonfinite"."""
    bad = {k: str(v) for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
    return {**{k: None if k in bad else v for k, v in row.items()}, **({"nonfinite": bad} if bad else {})}


def finite(loss, norm) -> bool:
    return math.isfinite(loss) and math.isfinite(float(norm))


def stop_if_diverged(row, args, out, log, title):
    """A non-finite loss or gradient norm ends the run at its step (train_step did not
    apply it): nothing more is saved, the last checkpoint stays, and the curve is drawn."""
    if finite(row["loss"], row["grad_norm"]):
        return
    log.plot(title)
    what = " and ".join(f"the {name} is {row[k]}" for k, name in (("loss", "loss"), ("grad_norm", "gradient norm"))
                        if not math.isfinite(row[k]))
    kept, state = "", os.path.join(out, "checkpoint", "trainer_state.json")
    if os.path.exists(state):
        with open(state) as f:
            kept = f"; the checkpoint of step {json.load(f)['step']} stays in {os.path.dirname(state)}"
    clip = f"a smaller --max-grad-norm (this run: {args.max_grad_norm:g})" if args.max_grad_norm > 0 else \
        "clipping with --max-grad-norm (off in this run)"
    raise TuluError(f"step {row['step']}: {what}; stopped without applying this step, nothing saved{kept}; "
                    f"try a lower --lr (this run: {args.lr:g}) or {clip}")


def check_finite_weights(named, what):
    """Never write non-finite weights (a step can overflow a weight with a finite loss).
    named: (name, tensor) pairs, the weights about to be written."""
    for n, p in named:
        if not torch.isfinite(p).all():
            raise TuluError(f"{n} holds non-finite values: {what} not written; "
                            f"try a lower --lr or --max-grad-norm")


# -----------------------------------------------------------------------------
# Checkpoints that resume exactly: weights, optimiser, step, random state


def pack(obj, tensors, path="s"):
    """Split a nested state (dicts, lists, tensors, numbers) into a JSON skeleton
    and a flat dict of tensors for safetensors: resume state without pickle."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(obj, dict):
        return {"dict": [[k, pack(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list": [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    return {"value": obj}


def unpack(o, tensors):
    if "tensor" in o:
        return tensors[o["tensor"]]
    if "dict" in o:
        return {k: unpack(v, tensors) for k, v in o["dict"]}
    if "list" in o:
        return [unpack(v, tensors) for v in o["list"]]
    return o["value"]


def rng_state():
    """The random state a resumed run continues from: the CPU's and this process's GPU's
    alone (each torchrun rank saves none of its own: see next_step), so that a run
    saved on 8 GPUs resumes on 4, or under another CUDA_VISIBLE_DEVICES."""
    cuda = torch.cuda.is_initialized()  # a --device cpu run never creates a CUDA context for this
    return {"cpu": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state()] if cuda else []}


def set_rng_state(rng):
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"][0])  # this process's GPU (checkpoints of old kept one per GPU)


PIECE = 1 << 16  # bytes of each piece a large file's fingerprint reads


@functools.lru_cache(maxsize=None)
def file_digest(path, size, mtime_ns, sampled) -> str:
    """sha256 of a file's bytes, or with `sampled`, of 16 pieces of 64 KiB spread
    evenly over it: a 140 GB model is told from another in a second (a fine-tuned
    weight differs in every piece). size and mtime_ns make the cache forget a changed file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if not sampled or size <= 16 * PIECE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            for i in range(16):
                f.seek((size - PIECE) * i // 15)
                h.update(f.read(PIECE))
    return h.hexdigest()


def fingerprint(path) -> dict:
    """What a run read, by content: a data file whole (its size and sha256); a model or
    adapter folder by its configs, tokenizer and weights, large files sampled."""
    digest = lambda p, sampled: file_digest(p, os.path.getsize(p), os.stat(p).st_mtime_ns, sampled)
    if os.path.isfile(path):
        return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": digest(path, False)[:12]}
    names = sorted(n for n in os.listdir(path) if n.endswith((".json", ".safetensors", ".bin", ".model"))
                   and n != FINISHED and os.path.isfile(os.path.join(path, n)))
    h = hashlib.sha256("".join(f"{n} {digest(os.path.join(path, n), True)}\n" for n in names).encode())
    return {"path": os.path.abspath(path), "sha256": h.hexdigest()[:12]}


def run_record(args, examples=None, total=None) -> dict:
    """What a resumed run must share with its checkpoint to continue the same loss curve:
    the recipe, the global batch, and the model, adapter and data by content (a folder
    that moved is the same; a file changed in place is not). examples and total are
    known once the data is read; before that (check_resume) the rest is compared."""
    keys = ["command", "method", "lr", "warmup_ratio", "seed", "max_seq_length", "max_grad_norm", "weight_decay",
            "adam_eps", "beta", "loss", "label_smoothing"]
    if args.method != "full":  # an --adapter brings its own rank and alpha
        keys += ["lora_dropout"] + ([] if getattr(args, "adapter", None) else ["lora_r", "lora_alpha"])
    run = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    run.update(global_batch=args.batch_size * args.grad_accum * dist_of(args).world, adam_betas=list(args.adam_betas))
    run.update({k: fingerprint(getattr(args, k)) for k in ("model", "adapter", "data") if getattr(args, k, None)})
    return run if examples is None else {**run, "total_steps": total, "examples": examples}


def differences(saved: dict, run: dict) -> str:
    """'key: then -> now; ...' for each setting of `run` that the checkpoint recorded
    otherwise (settings it does not record, written by an older tulu, are not compared).
    Files are compared by content, and named by path and hash."""
    show = lambda v: (f"{v['path']} ({v['bytes']} bytes, sha256 {v['sha256']})" if "bytes" in v else
                      f"{v['path']} (sha256 {v['sha256']})") if isinstance(v, dict) else v
    same = lambda a, b: a.get("sha256") == b.get("sha256") if isinstance(a, dict) and isinstance(b, dict) else a == b
    return "; ".join(f"{k}: {show(saved[k])} -> {show(v)}" for k, v in run.items()
                     if k in saved and not same(saved[k], v))


# On disk, out/checkpoint/ is whole whenever a kill comes. save_checkpoint writes
# out/checkpoint.tmp/, its trainer_state.json last, then settle_checkpoint makes the
# newest whole one out/checkpoint/ and removes the rest; a folder without
# trainer_state.json is never read. A kill while the new one is written leaves the old
# one; once it is written, the new one, under either name (the next save or --resume
# settles them). A finished run leaves finished.json instead.

CHECKPOINT, FINISHED, STATE = "checkpoint", "finished.json", "trainer_state.json"


def read_state(path):
    """The JSON object in `path`, or None where there is none (or half of one)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def discard(folder):
    """Remove a checkpoint folder, its trainer_state.json first: a kill halfway leaves a
    folder that is never taken for a whole checkpoint."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, STATE))
    shutil.rmtree(folder, ignore_errors=True)


def settle_checkpoint(root) -> str | None:
    """Make root/checkpoint the newest whole checkpoint among what save_checkpoint may
    leave (checkpoint, checkpoint.tmp*, and earlier versions' checkpoint.old*), remove
    the others, and return its path (None: there is none). The newest is only ever
    renamed, so a kill during this leaves it findable too. Beside finished.json, every
    checkpoint is one that a kill during finish_run left: it goes."""
    final = os.path.join(root, CHECKPOINT)
    names = [n for n in (os.listdir(root) if os.path.isdir(root) else [])
             if n == CHECKPOINT or n.startswith((CHECKPOINT + ".tmp", CHECKPOINT + ".old"))]
    found = sorted(((read_state(os.path.join(root, n, STATE)) or {}).get("step", -1), n != CHECKPOINT, n)
                   for n in names)  # the newest last; at equal steps a new one over checkpoint/
    if not found or found[-1][0] < 0 or os.path.exists(os.path.join(root, FINISHED)):
        for n in names:
            discard(os.path.join(root, n))
        return None
    best = os.path.join(root, found[-1][2])
    if best != final:
        discard(final)
        os.replace(best, final)
        sync(root)
    for _, _, n in found[:-1]:
        if n != CHECKPOINT:
            discard(os.path.join(root, n))
    return final


def sync(path):
    """Flush a file's or a folder's entries to disk, so that a machine that crashes (not
    only a killed process) still has whole checkpoints."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out, step, model, opt, rng, run):
    """out/checkpoint/: trainable weights, optimiser state and RNG after `step`
    completed steps, written beside the old one and swapped in by rename."""
    from safetensors.torch import save_file
    weights = gathered({n: p for n, p in model.named_parameters() if p.requires_grad})
    optimizer = gathered(opt.state_dict())
    if not rank0():
        return  # under torchrun every rank helps gather FSDP's shards; rank 0 writes
    check_finite_weights(weights.items(), "checkpoint")
    tmp = os.path.join(out, CHECKPOINT + ".tmp")
    discard(tmp)  # a save that a kill cut short
    os.makedirs(tmp)
    save_file({n: w.contiguous() for n, w in weights.items()}, os.path.join(tmp, "trainable.safetensors"))
    tensors = {}
    skeleton = pack({"optimizer": optimizer, "rng": rng}, tensors)
    save_file(tensors, os.path.join(tmp, "state.safetensors"))
    for name in os.listdir(tmp):
        sync(os.path.join(tmp, name))
    write_json(os.path.join(tmp, STATE), {"step": step, "run": run, "state": skeleton})  # last: now it is whole
    sync(os.path.join(tmp, STATE))
    settle_checkpoint(out)


def resume_root(args) -> str:
    """The output folder a run resumes from (--resume names it or its checkpoint/), else --output."""
    path = os.path.normpath(args.resume or args.output)
    return os.path.dirname(path) if os.path.basename(path) == CHECKPOINT else path


def check_resume(args, root):
    """Before the model loads. --resume of a finished run: say so, exit 0, retrain
    nothing; of a run made with other settings, or of nothing: a one-line error. A new
    run refuses an --output holding an unfinished run's checkpoint, the work it would lose."""
    finished, state = read_state(os.path.join(root, FINISHED)), read_state(os.path.join(root, CHECKPOINT, STATE))
    ckpt = os.path.join(root, CHECKPOINT)
    if not args.resume:
        if state and not finished:
            raise TuluError(f"{ckpt}: {args.output} holds an unfinished run (checkpoint of step {state['step']}): "
                            f"continue it with --resume {args.output}, or choose another --output")
        return
    if finished:
        changed = differences(finished["run"], run_record(args))
        if changed:
            raise TuluError(f"{os.path.join(root, FINISHED)}: that run finished, with other settings ({changed}); "
                            f"start a new run with another --output")
        if dist_of(args).main:
            print(f"{root}: the run finished all {finished['step']} steps ({FINISHED}): nothing to resume")
        sys.exit(0)
    if not state:
        raise TuluError(f"{args.resume}: no checkpoint to resume from ({CHECKPOINT}/{STATE} missing)")
    changed = differences(state["run"], run_record(args))
    if changed:
        raise TuluError(f"{ckpt}: the checkpoint was made with other settings ({changed})")


def load_checkpoint(path, model, opt, run) -> int:
    """Restore what save_checkpoint wrote; returns the number of completed steps.
    `run` (run_record) must be the one the checkpoint was made with, or the resumed run
    would not continue the same curve."""
    from safetensors.torch import load_file
    ckpt = path if os.path.exists(os.path.join(path, STATE)) else os.path.join(path, CHECKPOINT)
    meta = read_state(os.path.join(ckpt, STATE))
    if meta is None:
        raise TuluError(f"{path}: no checkpoint to resume from ({STATE} missing)")
    changed = differences(meta["run"], run)
    if changed:
        raise TuluError(f"{ckpt}: the checkpoint was made with other settings ({changed})")
    weights = load_file(os.path.join(ckpt, "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if weights.keys() != params.keys():
        raise TuluError(f"{ckpt}: its trainable weights do not match this model and --method")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(placed(weights[n], p))
    state = unpack(meta["state"], load_file(os.path.join(ckpt, "state.safetensors")))
    opt.load_state_dict(placed_state(state["optimizer"], opt))
    set_rng_state(state["rng"])
    print(f"resumed from {ckpt} after step {meta['step']}")
    return meta["step"]


def finish_run(out, step, run):
    """After the outputs are written: finished.json records the run, then its checkpoint
    goes (a kill between the two leaves both: settle_checkpoint removes it)."""
    write_json(os.path.join(out, FINISHED), {"step": step, "run": run})
    discard(os.path.join(out, CHECKPOINT))


def forget_finished(out):
    """A run starts writing to `out`: an earlier run's finished.json there goes, so that
    --resume never takes one run for the other."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, FINISHED))


class MetricsLog:
    """metrics.jsonl, one JSON object per step; on resume, later lines are dropped, and
    so is a last line that a kill cut short (it has no newline)."""

    def __init__(self, out, start_step):
        self.path = os.path.join(out, "metrics.jsonl")
        rows = []
        if start_step and os.path.exists(self.path):
            with open(self.path) as f:
                rows = [r for r in (json.loads(line) for line in f if line.endswith("\n")) if r["step"] <= start_step]
        self.rows = rows
        atomic_write(self.path, lambda tmp: pathlib.Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def log(self, row):
        row = json_safe(row)
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, title):
        """loss.svg beside metrics.jsonl, at each checkpoint and at the end."""
        if self.rows:
            svg = loss_svg(self.rows, title)
            atomic_write(os.path.join(os.path.dirname(self.path), "loss.svg"), lambda tmp: pathlib.Path(tmp).write_text(svg))



def loss_svg(rows, title) -> str:
    """A line chart of metrics.jsonl rows as SVG text, no plotting library: loss
    against step on the left axis, and for DPO rewards/accuracy (0..1) on the right."""
    W, H, L, R, T, B = 640, 360, 60, 60, 30, 45  # size and margins
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y1 = max((v for v in loss if v is not None), default=1.0) * 1.05 or 1.0  # null: a non-finite step
    X = lambda s: L + (s - x0) / (x1 - x0) * (W - L - R)
    Y = lambda v, top: H - B - v / top * (H - T - B)
    line = lambda vals, top, color: (f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                                     + " ".join(f"{X(s):.1f},{Y(v, top):.1f}" for s, v in zip(steps, vals)
                                                if v is not None) + '"/>')
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
           f'<path d="M{L},{T} V{H - B} H{W - R}" fill="none" stroke="black"/>',
           f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">optimizer step</text>',
           f'<text transform="translate(16,{H / 2}) rotate(-90)" text-anchor="middle" fill="#1f77b4">loss</text>']
    for i in range(5):  # ticks: 5 on each axis
        v, s = y1 * i / 4, x0 + (x1 - x0) * i / 4
        out += [f'<text x="{L - 6}" y="{Y(v, y1) + 4:.1f}" text-anchor="end">{v:.2f}</text>',
                f'<text x="{X(s):.1f}" y="{H - B + 16}" text-anchor="middle">{s:.0f}</text>']
    out.append(line(loss, y1, "#1f77b4"))
    out += [f'<path d="M{X(s):.1f},{T} V{H - B}" stroke="#d62728" stroke-dasharray="4 3"/>'  # json_safe marked it
            f'<text x="{X(s) - 4:.1f}" y="{T + 12}" text-anchor="end" fill="#d62728">non-finite</text>'
            for s, r in zip(steps, rows) if "nonfinite" in r]
    if "rewards/accuracy" in rows[0]:
        out += [f'<path d="M{W - R},{T} V{H - B}" stroke="black"/>', line([r["rewards/accuracy"] for r in rows], 1.0, "#d62728"),
                f'<text transform="translate({W - 16},{H / 2}) rotate(90)" text-anchor="middle" fill="#d62728">'
                f'rewards/accuracy</text>']
        out += [f'<text x="{W - R + 6}" y="{Y(v, 1.0) + 4:.1f}">{v:.1f}</text>' for v in (0, 0.5, 1.0)]
    return "\n".join(out + ["</svg>\n"])

# -----------------------------------------------------------------------------
# More than one GPU: torchrun, DDP for LoRA/QLoRA, FSDP2 for full fine-tuning
#
# `torchrun --nproc_per_node N tulu.py sft ...` starts N copies of this program and
# tells each its RANK, WORLD_SIZE and LOCAL_RANK (as nanoGPT's train.py reads them).
# A step takes batch-size x grad-accum x N examples: the micro-batches one process
# takes with grad-accum x N, dealt out to the ranks in turn. Every rank divides by the
# learned tokens (or pairs) of the whole step, summed over the ranks, so the summed
# gradient, the loss and the clipping norm are one process's, up to rounding.
# lora/qlora: DDP over the adapters, each rank holding the frozen base; full: FSDP2
# (as torchtune's full_finetune_distributed) shards every weight, its gradient and
# AdamW state over the ranks. Rank 0 alone prints and writes, the files one process writes.


@dataclass
class Dist:
    """This process among torchrun's; without torchrun, rank 0 of 1."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # for collectives' tensors (NCCL: this rank's GPU)
    stop: bool = False  # Ctrl-C or SIGTERM arrived (see next_step)
    waits: object = None  # the process group for long waits on one rank (setup_distributed)

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def dist_of(args) -> Dist:
    return getattr(args, "dist", SINGLE)


WAIT_TIMEOUT = datetime.timedelta(hours=3)  # rank 0 alone encoding data or writing a checkpoint


def rank_device(local_rank: int) -> torch.device:
    """This rank's GPU: LOCAL_RANK among the visible ones, modulo their number where a
    scheduler shows each task only its own GPU (Slurm's per-task binding: one device,
    LOCAL_RANK 0..7)."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup_distributed(device: str) -> Dist:
    """Join torchrun's process group: NCCL, each rank on the GPU LOCAL_RANK names, or
    gloo on CPU. Without torchrun, or inside a run (the demo SFT that rank 0 builds), a
    Dist of one. Ctrl-C and SIGTERM now only raise a flag (next_step). Ranks other than 0
    print nothing and draw no progress bars (their errors still reach stderr)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 or torch.distributed.is_initialized():
        return Dist()
    rank, local, cuda = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), device == "cuda"
    dev = rank_device(local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)  # from here on, "cuda" is this rank's GPU
    torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    # the waits for one rank (rank 0 encoding a large data file or writing a 70B checkpoint)
    # go through a gloo group of their own with a long timeout; NCCL's 10 minutes stay the
    # limit for a collective of the training step, where a hung rank should fail fast
    waits = torch.distributed.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    d = Dist(rank, world, local, dev, waits=waits)
    for sig in (signal.SIGINT, signal.SIGTERM):  # torchrun passes a Ctrl-C on as SIGINT
        signal.signal(sig, lambda *_: setattr(d, "stop", True))
    if not d.main:
        sys.stdout = open(os.devnull, "w")
        init = tqdm.__init__
        tqdm.__init__ = lambda self, *a, **kw: init(self, *a, **{**kw, "disable": True})
    return d


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank0() -> bool:
    return not distributed() or torch.distributed.get_rank() == 0


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return distributed() and isinstance(model, FSDPModule)


def exit_after(main):
    """Run main() and exit with its status; under torchrun, destroy the process group
    first, once the error that ended the run (and the model it holds) is gone: a gloo
    group that lives on into Python's shutdown can abort the process."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if distributed():
        gc.collect()  # FSDP's modules sit in reference cycles
        torch.distributed.destroy_process_group()
    sys.exit(code)


def rank0_first(d: Dist, fn, *args):
    """fn(*args) on rank 0, then on the other ranks, which find cached what it made: the
    demo model, the encoded data (one rank encodes the file, not every rank the whole
    file; a node that does not share rank 0's cache folder encodes it again). An error
    on any rank ends every rank, as in together."""
    if d.world == 1:
        return fn(*args)
    first = d.main
    out = together(d, lambda: fn(*args) if first else None)
    return together(d, lambda: out if first else fn(*args))


class RankError(TuluError):
    """An error that every rank raises (see together); rank 0 alone prints it."""


def error_text(e) -> str:
    return f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)


def together(d: Dist, fn, *args):
    """fn(*args) on every rank. A TuluError or OSError on any rank (a data file missing on
    one node) ends every rank with its one-line error, where the others would wait for
    the failed rank in their next collective."""
    if d.world == 1:
        return fn(*args)
    try:
        out, err = fn(*args), None
    except (TuluError, OSError) as e:
        out, err = None, error_text(e)
    errors = [None] * d.world
    torch.distributed.all_gather_object(errors, err, group=d.waits)
    rank, err = next(((r, e) for r, e in enumerate(errors) if e), (0, None))
    if err:
        raise RankError(err if rank == 0 else f"{err} (rank {rank})")
    return out


def shard(model, d: Dist, compute_dtype=torch.float32):
    """FSDP2 (--method full under torchrun): one unit per decoder layer, then the root
    (embeddings, final norm, lm_head). A rank keeps 1/N of each weight, gradient and
    AdamW state, and gathers a unit's weights only while it computes with them. With
    bf16 compute the shards stay float32 (master weights) and are gathered in bf16,
    half the bytes sent; gradients are reduced in float32 (torchtune's policy)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # the root reshards after forward too (as torchtune's): after a no-grad forward (DPO's
    # reference) it would hold whole weights, which the optimiser built next would take
    return fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=mp)  # moves the shards to the device


def data_parallel(args, model):
    """The model train_step runs: under torchrun with lora/qlora, DDP, which averages the
    adapters' gradients over the ranks in the backward of a step's last micro-batch, in
    its buckets (the gradients are views of them: no second copy). The frozen (NF4) base
    is read by every rank and never sent; rank 0's adapters are (DDP's init_sync would
    send the base too, and broadcast_buffers its NF4 buffers)."""
    d = dist_of(args)
    if d.world == 1:
        return model
    print(f"torchrun: {d.world} ranks, {'FSDP2' if is_sharded(model) else 'DDP'}; global batch = "
          f"batch-size x grad-accum x ranks = {args.batch_size} x {args.grad_accum} x {d.world} = "
          f"{args.batch_size * args.grad_accum * d.world} examples a step")
    if is_sharded(model):
        return model
    for p in model.parameters():
        if p.requires_grad:
            torch.distributed.broadcast(p.detach(), src=0)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, init_sync=False,
        broadcast_buffers=False, gradient_as_bucket_view=True)


def grad_sync(model, last: bool):
    """DDP: gradients stay on each rank until a step's last micro-batch, then one
    all-reduce. FSDP reduce-scatters after every micro-batch: waiting would keep whole
    gradients on every rank, the memory that sharding saves."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return model.no_sync() if ddp and not last else contextlib.nullcontext()


def deal(batches, d: Dist) -> list:
    """This rank's share of one process's batches: every N-th, from the rank's own. All
    ranks get as many (FSDP gathers weights in each forward, all ranks together): None
    stands for a batch that a rank is short of."""
    mine = batches[d.rank::d.world]
    return mine + [None] * (math.ceil(len(batches) / d.world) - len(mine))


def undeal(results, n: int, d: Dist) -> list:
    """Every rank's results for its deal of n batches, one per batch, in the batches' order."""
    if d.world == 1:
        return results
    shares = [None] * d.world
    torch.distributed.all_gather_object(shares, results)
    return [shares[k % d.world][k // d.world] for k in range(n)]


def rank_batches(idx, examples, task, d: Dist) -> list:
    """This rank's collated micro-batches of a step, whose micro-batches in one process
    are idx (example indices); where a rank is short of one, a stand-in: the step's first
    example with weight 0."""
    stand_in = lambda: {**task.collate([examples[idx[0][0]]]), "weight": 0}
    return [task.collate([examples[i] for i in c]) if c else stand_in() for c in deal(idx, d)]


def all_sum(d: Dist, *values) -> list:
    """Each value summed over the ranks, in one all-reduce."""
    if d.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def next_step(d: Dist, seed: int, step: int, save: bool) -> tuple[bool, bool]:
    """Before each step: (stop, save), each True on every rank if it is on any: a rank
    asked to stop (Ctrl-C, SIGTERM) or due a checkpoint (--save-minutes reads each rank's
    clock), so that all stop, or save, after the same step; one all-reduce. Under
    torchrun dropout is reseeded from (seed, step, rank): ranks draw different masks, and
    a resumed run the same, with no per-rank RNG saved."""
    if d.world == 1:
        return d.stop, save
    torch.manual_seed(hash((seed, step, d.rank)))
    flags = torch.tensor([float(d.stop), float(save)], device=d.device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags[0].item() > 0, flags[1].item() > 0


def whole(t):
    """A tensor that FSDP shards (a DTensor) gathered whole, on every rank; else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gathered(obj):
    """obj (nested dicts and lists) with each tensor whole on rank 0's CPU. The other
    ranks take part in gathering FSDP's shards, a tensor at a time, and keep None."""
    if isinstance(obj, dict):
        return {k: gathered(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gathered(v) for v in obj)
    if torch.is_tensor(obj):
        t = whole(obj).detach()
        return t.cpu() if rank0() else None
    return obj


def placed(value, like):
    """A whole tensor cut to this rank's shard where `like` is sharded (FSDP); else value."""
    if not hasattr(like, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor  # each rank cuts its own shard: no messages
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def placed_state(state, opt):
    """A whole optimiser state (one process's) cut to this rank's shards."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {**state, "state": {i: {k: placed(v, params[int(i)]) if v.dim() else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def full_model(model):
    """Rank 0: the model whole, to save (FSDP's shards gathered to its CPU); others: None."""
    if is_sharded(model):
        sd, cfg = gathered(model.state_dict()), model.config  # every rank takes part
        if rank0():
            with torch.device("meta"):
                model = llama.Llama(cfg)
            model.load_state_dict(sd, assign=True)
    return model if rank0() else None


class MemoryLog:
    """What ranks other than 0 keep instead of metrics.jsonl and loss.svg: the rows."""

    def __init__(self):
        self.rows = []

    def log(self, row):
        self.rows.append(row)

    def plot(self, title):
        pass


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


def example_lengths(examples) -> list[int]:
    """Each example's padded length in a batch: its longest sequence (a pair's two
    answers are padded to the longer one)."""
    if isinstance(examples, Examples):
        lengths = (examples.offsets[1:] - examples.offsets[:-1]).view(-1, examples.width)
        return lengths.max(1).values.tolist()
    return [max(len(s) for s in e if not isinstance(s, float)) for e in examples]


def train_step(args, model, opt, params, batches, task):
    """One optimiser step over its micro-batches; returns the step's metrics. Under
    torchrun: this rank's micro-batches (rank_batches), and sums over all ranks."""
    d = dist_of(args)
    denom = max(1, all_sum(d, sum(task.count(b) * b.get("weight", 1) for b in batches))[0])
    loss, sums = 0.0, {}
    for i, b in enumerate(batches):
        w = b.get("weight", 1)  # 0: a stand-in (rank_batches)
        b = {k: v.to(args.device) for k, v in b.items() if k != "weight"}
        with autocast(args), grad_sync(model, last=i == len(batches) - 1):
            l, m = task.loss(model, b, denom)
        (l * (w * d.world)).backward()  # DDP and FSDP average gradients over the ranks: we want the sum
        loss += l.item() * w
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * w
    norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
    norm = float(whole(norm))  # under FSDP the whole gradient's norm, the same on every rank
    tokens = sum(int(b["attention_mask"].sum()) * b.get("weight", 1) for b in batches)
    loss, tokens, *totals = all_sum(d, loss, tokens, *sums.values())
    if finite(loss, norm):  # decided on the step's whole loss and norm: every rank alike
        opt.step()  # a step with a NaN/inf loss or gradient is never applied; train() stops on its row
    opt.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": norm, "tokens": int(tokens),
            **{k: v / denom for k, v in zip(sums, totals)}}


@contextlib.contextmanager
def stop_signals(d: Dist):
    """While one process trains, Ctrl-C and SIGTERM (a scheduler's preemption, `scancel`)
    only raise d.stop: the loop stops after the step in progress, as torchrun's ranks do
    (setup_distributed), never inside an optimiser step. A second Ctrl-C stops at once."""
    if d.world > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(sig, frame):
        if d.stop and sig == signal.SIGINT:
            raise KeyboardInterrupt
        d.stop = True
        os.write(2, f"\n{signal.Signals(sig).name}: stopping after this step "
                    f"(Ctrl-C again: at once, without saving)\n".encode())
    d.stop = False
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        d.stop = False


def save_due(args, done, start, since) -> bool:
    """A periodic checkpoint before the next step: every --save-every steps, and when
    --save-minutes have passed since the last one (or the start)."""
    steps = args.save_every and done % args.save_every == 0
    minutes = args.save_minutes and time.monotonic() - since >= 60 * args.save_minutes
    return done > start and bool(steps or minutes)


def stop_now(bar, d: Dist, out, done):
    """After Ctrl-C or SIGTERM, once the checkpoint of `done` steps is written."""
    bar.close()
    if d.main:
        print(f"\ninterrupted: {done} steps are saved in {out}/{CHECKPOINT}; continue with --resume {out}",
              file=sys.stderr)
    sys.exit(130)


def train(args, model, examples, task, out, save=None):
    """Tulu 2's loop: AdamW (paged for QLoRA), linear warmup and decay, gradient
    accumulation, clipping; tqdm, metrics.jsonl, periodic checkpoints, Ctrl-C, SIGTERM and
    --resume. save() writes the outputs after the last step; then finish_run."""
    d = dist_of(args)
    E = args.batch_size * args.grad_accum * d.world  # the global batch
    steps_per_epoch = math.ceil(len(examples) / E)
    total = args.max_steps or args.epochs * steps_per_epoch
    lengths = example_lengths(examples) if getattr(args, "group_by_length", False) else None
    warmup = int(total * args.warmup_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(args, model)
    run = run_record(args, len(examples), total)
    start = together(d, load_checkpoint, args.resume, model, opt, run) if args.resume else 0
    if d.main:
        forget_finished(out)
    log = MetricsLog(out, start) if d.main else MemoryLog()
    net = data_parallel(args, model)
    title = f"tulu {args.command} --method {args.method}: {os.path.basename(os.path.normpath(args.model if hasattr(args, 'model') else out))}"
    model.train()
    rng, done, saved, since = rng_state(), start, start if args.resume else None, time.monotonic()

    def checkpoint():
        nonlocal saved, since
        together(d, save_checkpoint, out, done, model, opt, rng, run)  # the others wait for rank 0's write
        log.plot(title)
        saved, since = done, time.monotonic()
    bar = tqdm(range(start, total), initial=start, total=total, desc=args.command, dynamic_ncols=True)
    with stop_signals(d):
        try:
            for step in bar:
                stop, due = next_step(d, args.seed, step, save_due(args, done, start, since))  # the same on every rank
                if due and saved != done:
                    checkpoint()
                    stop = next_step(d, args.seed, step, False)[0]  # a SIGTERM during the save: no step more
                if stop:
                    if saved != done:
                        checkpoint()
                    stop_now(bar, d, out, done)
                lr = args.lr * linear_schedule(step, warmup, total)
                for g in opt.param_groups:
                    g["lr"] = lr
                t0 = time.time()
                idx = step_batches(len(examples), step, steps_per_epoch, args.batch_size, args.grad_accum * d.world,
                                   args.seed, lengths)  # one process's micro-batches with the same global batch
                row = train_step(args, net, opt, params, rank_batches(idx, examples, task, d), task)
                row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 3), "lr": lr, **row,
                       "tokens_per_s": round(row["tokens"] / (time.time() - t0), 1)}
                log.log(row)
                stop_if_diverged(row, args, out, log, title)
                rng, done = rng_state(), step + 1
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        except KeyboardInterrupt:  # a second Ctrl-C, maybe inside an optimiser step: nothing more is saved
            bar.close()
            kept = (f"the checkpoint of step {saved} stays; continue with --resume {out}" if saved is not None
                    else "no checkpoint was written")
            print(f"\nstopped at once: {kept}", file=sys.stderr)
            sys.exit(130)
        bar.close()
        log.plot(title)
        model.eval()
        if save is not None:  # still under stop_signals: a SIGTERM now waits for whole outputs
            save()
            if d.main:
                finish_run(out, total, run)
    return log.rows


# -----------------------------------------------------------------------------
# Commands


def stop_ids(model_dir, tok) -> list[int]:
    """The tokenizer's EOS id and every EOS id the model folder names: config.json's
    and generation_config.json's eos_token_id, an id or a list of them (Llama 3.1
    Instruct stops at <|end_of_text|>, <|eom_id|> and <|eot_id|>)."""
    ids = [tok.eos_id]
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                value = json.load(f).get("eos_token_id")
            ids += value if isinstance(value, list) else [value]
    return sorted({i for i in ids if i is not None})


def copy_tokenizer(src, out, names=TOKENIZER_FILES):
    for name in names:
        if os.path.exists(os.path.join(src, name)) and os.path.abspath(src) != os.path.abspath(out):
            atomic_write(os.path.join(out, name), lambda tmp, n=name: shutil.copyfile(os.path.join(src, n), tmp))


def save_outputs(args, model, model_dir, out):
    """lora/qlora: a PEFT adapter; full: a Hugging Face model folder. Both get the tokenizer."""
    from lora import save_adapter
    model = full_model(model)  # under torchrun: rank 0's, FSDP's shards gathered; None elsewhere
    if model is None:
        return
    check_finite_weights(((n, p) for n, p in model.named_parameters() if p.requires_grad or args.method == "full"),
                         "output")
    if args.method == "full":  # in the base checkpoint's dtype, as open-instruct and transformers' Trainer
        save_model(model, out, dtype=llama.checkpoint_dtype(model_dir))
        copy_tokenizer(model_dir, out, ("generation_config.json",))
    else:
        save_adapter(model, out, base_model_name_or_path=model_dir)
    copy_tokenizer(tokenizer_source(getattr(args, "adapter", None), model_dir), out)
    print(f"wrote {'model' if args.method == 'full' else 'adapter'}, tokenizer and metrics.jsonl to {out}")


def print_config(args):
    shown = {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
             for k, v in vars(args).items() if k not in ("func", "dist")}
    print("config: " + " ".join(f"{k}={v}" for k, v in shown.items()))


def start_run(args, default_model, default_data):
    """Fill in the defaults (the tiny demo's when there is no --model), print the
    settings, check the model folder, seed. Returns (demo?, tokenizer)."""
    args.dist = setup_distributed(resolve_device(args.device))  # torchrun's process group, if any
    demo = args.model is None
    args.model = args.model or rank0_first(args.dist, default_model)
    args.data = args.data or os.path.join(DATA, default_data)
    fill_defaults(args, demo)
    print_config(args)
    together(args.dist, llama.checkpoint_files, args.model)  # a missing or unusable folder: say so first
    check_output(args.output, args.model, getattr(args, "adapter", None))
    root = resume_root(args)
    rank0_first(args.dist, lambda: settle_checkpoint(root))  # a kill during a save: its newest whole checkpoint
    together(args.dist, check_resume, args, root)  # before the model loads
    torch.manual_seed(args.seed)
    return demo, together(args.dist, lambda m: check_vocab(Tokenizer(m), m), args.model)


def cmd_sft(args):
    demo, tok = start_run(args, tiny_default, "sft_train.jsonl")
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
    return tiny_default_model(cache_dir(), read_jsonl, read_objects, chat_text, train, SFTTask)


def tiny_sft() -> str:
    """Where dpo, chat and eval start without --model: the tiny default after the
    demo's full SFT, run once by this command line."""
    return tiny_sft_model(tiny_default, main)


def cmd_dpo(args):
    demo, tok = start_run(args, tiny_sft, "prefs_train.jsonl")
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
    train(args, model, pairs, task, args.output, save=lambda: save_outputs(args, model, args.model, args.output))
    if demo:
        print_answers(DEMO_HELDOUT, prompts, {"SFT": sft_answers, "DPO": demo_answers(model, tok, args.model)[1]})
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
        reply = stream_reply(model, tok, history, args, g)
        history.append({"role": "assistant", "content": reply})
        if args.prompt is not None:
            return


def read_prompt():
    try:
        line = input("\n<|user|>\n")
    except EOFError:
        return None
    return None if line.strip() in ("/exit", "/quit") else line


def stream_reply(model, tok, history, args, g):
    """Generate the assistant's answer and print it as it comes."""
    new, shown = [], ""
    print("<|assistant|>")

    def on_token(i):
        nonlocal shown
        new.append(i)
        text = tok.decode([t for t in new if t not in args.stop_ids])
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text

    llama.generate(model, encode_prompt(history, tok), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=args.stop_ids, on_token=on_token, generator=g)
    final = tok.decode([t for t in new if t not in args.stop_ids])
    print(final[len(shown):])  # a character cut off by --max-new-tokens shows as it stays in the history
    return final



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
    load = lambda path: load_model(path, dtype=args.dtype, device=args.device, quantize="nf4" if args.qlora else None)
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
        return report(args, kind, len(examples), choice_metrics(examples, dev, shots, tok, args, score), shots)
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

# -----------------------------------------------------------------------------
# The command line. Defaults come from the model cards and papers; each is
# listed with its source in --help. With no --model, the tiny demo's own
# defaults apply (a model trained from scratch needs a far larger lr).

RECIPES = {  # (command, method family) -> defaults
    ("sft", "full"): dict(lr=2e-5, epochs=2, warmup_ratio=0.03, max_grad_norm=0.0, batch_size=4, grad_accum=32,
                          max_seq_length=8192),   # Tulu 2 SFT: arXiv 2311.10702 Sec. 3 / model cards
    ("sft", "lora"): dict(lr=1e-4, epochs=5, warmup_ratio=0.03, max_grad_norm=0.3, batch_size=4, grad_accum=32,
                          max_seq_length=8192),   # Tulu 2 QLoRA 70B card; clip 0.3 from QLoRA (2305.14314)
    ("dpo", "full"): dict(lr=5e-7, epochs=3, warmup_ratio=0.1, max_grad_norm=0.0, batch_size=4, grad_accum=8,
                          max_seq_length=2048),   # Tulu 2 DPO: beta 0.1, lr 5e-7, batch 32, 3 epochs
    ("dpo", "lora"): dict(lr=5e-6, epochs=3, warmup_ratio=0.1, max_grad_norm=0.3, batch_size=4, grad_accum=8,
                          max_seq_length=2048),   # lr from alignment-handbook's zephyr-7b-dpo-qlora recipe
    # The tiny demo, tuned by bench/demo_exact_match.py (held-out exact match): its adapters learn
    # best at 5e-3, every weight at 5e-4 (62% right; 1e-3: 60%, 2e-3: 57%, 3e-3: 42%); DPO at 1e-4
    # raises held-out reward accuracy without costing right answers (3e-4: one fewer of 40; 1e-3:
    # a sixth fewer).
    ("sft", "demo"): dict(lr=5e-3, epochs=3, warmup_ratio=0.03, max_grad_norm=1.0, batch_size=16, grad_accum=1,
                          max_seq_length=256),
    ("sft", "demo-full"): dict(lr=5e-4, epochs=3, warmup_ratio=0.03, max_grad_norm=1.0, batch_size=16,
                               grad_accum=1, max_seq_length=256),
    ("dpo", "demo"): dict(lr=1e-4, epochs=2, warmup_ratio=0.1, max_grad_norm=1.0, batch_size=16, grad_accum=1,
                          max_seq_length=256),
}


def fill_defaults(args, demo):
    """Replace unset (None) flags by the recipe's value; resolve device and dtype."""
    family = "demo" if demo else ("full" if args.method == "full" else "lora")
    if demo and args.method == "full" and (args.command, "demo-full") in RECIPES:
        family = "demo-full"
    for k, v in RECIPES[(args.command, family)].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lora_dropout is None:  # DPO turns dropout off so that policy == reference at step 0 (as TRL)
        args.lora_dropout = 0.0 if args.command == "dpo" else 0.1
    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)
    if args.resume and not args.output:  # continue in the folder being resumed
        r = os.path.normpath(args.resume)
        args.output = os.path.dirname(r) if os.path.basename(r) == "checkpoint" else r
    args.output = args.output or os.path.join("out", f"{args.command}-{args.method}")


SOURCES = {("sft", "full"): "Tulu 2 SFT, arXiv 2311.10702", ("sft", "lora"): "Tulu 2 QLoRA 70B model card",
           ("dpo", "full"): "Tulu 2 DPO, arXiv 2311.10702",
           ("dpo", "lora"): "alignment-handbook zephyr-7b-dpo-qlora for the lr, else Tulu 2 DPO"}


def recipe_help(command, key, what, lora_source=None):
    """'what (default X full [source], Y lora/qlora [source]; Z for the demo[, W with full])'."""
    r = lambda m: RECIPES[(command, m)][key]
    demo_full = RECIPES.get((command, "demo-full"), {}).get(key, r("demo"))
    with_full = f", {demo_full} with full" if demo_full != r("demo") else ""
    return (f"{what} (default {r('full')} for full fine-tuning [{SOURCES[(command, 'full')]}], {r('lora')} "
            f"with lora/qlora [{lora_source or SOURCES[(command, 'lora')]}]; {r('demo')} for the tiny demo{with_full})")


def positive_int(s):
    if not s.lstrip("-").isdigit() or int(s) <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive integer")
    return int(s)


def count(s):
    if not s.isdigit():
        raise argparse.ArgumentTypeError(f"{s!r} is not a non-negative integer")
    return int(s)


def training_flags(p, command):
    b = RECIPES[(command, "full")]
    p.add_argument("--model", help="HF Llama folder (default: the tiny demo model, built once and cached "
                                   "under $XDG_CACHE_HOME/tulu)")
    p.add_argument("--output", help=f"output folder (default: out/{command}-METHOD, or the --resume folder)")
    p.add_argument("--method", choices=["qlora", "lora", "full"], default="qlora",
                   help="qlora: NF4 base + LoRA + paged AdamW (QLoRA, arXiv 2305.14314); lora: LoRA on a "
                        "bf16/fp32 base; full: every weight (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, help=recipe_help(command, "epochs", "passes over the data"))
    p.add_argument("--max-steps", type=count, default=0, help="stop after N optimiser steps (default 0: all epochs)")
    p.add_argument("--lr", type=float, help=recipe_help(command, "lr", "peak learning rate"))
    p.add_argument("--batch-size", type=positive_int, help=recipe_help(command, "batch_size", "examples per micro-batch"))
    p.add_argument("--grad-accum", type=positive_int, help=recipe_help(
        command, "grad_accum", f"micro-batches per optimiser step; batch-size x grad-accum = "
                               f"{b['batch_size'] * b['grad_accum']}, the model cards' batch"))
    p.add_argument("--max-seq-length", type=positive_int, help=recipe_help(command, "max_seq_length",
                                                                           "truncate longer examples"))
    p.add_argument("--warmup-ratio", type=float, help=recipe_help(
        command, "warmup_ratio", "linear warmup over this fraction of the steps, then linear decay to 0"))
    p.add_argument("--max-grad-norm", type=float, help=recipe_help(
        command, "max_grad_norm", "gradient clipping, 0 = off", lora_source="QLoRA, arXiv 2305.14314"))
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0, Tulu 2)")
    p.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("BETA1", "BETA2"),
                   help="AdamW betas (default 0.9 0.999, Tulu 2)")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon (default 1e-8, Tulu 2)")
    p.add_argument("--lora-r", type=positive_int, default=64, help="LoRA rank (default 64, Tulu 2 QLoRA model card)")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16, Tulu 2 QLoRA model card)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.1 for sft, Tulu 2 QLoRA model card; "
                                                      "0 for dpo so that policy = reference at step 0, as TRL)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (QLoRA)")
    p.add_argument("--compile", action="store_true", help=(
        "torch.compile each decoder layer (default: off): fused kernels for the elementwise work, meant for "
        "CUDA; the first step compiles for tens of seconds, and on a CPU the step is no faster (README)"))
    p.add_argument("--group-by-length", action="store_true", help=(
        "cut each step's examples into micro-batches longest first, so that little is padded: faster on data "
        "of mixed lengths; the step's examples and summed gradient stay the same, only dropout masks and "
        "float rounding differ (default: off, shuffled order, as transformers' group_by_length)"))
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42, open-instruct's)")
    p.add_argument("--save-every", type=count, default=0, metavar="N", help="also checkpoint every N steps "
                   "(default 0: by time only, --save-minutes)")
    p.add_argument("--save-minutes", type=float, default=30.0, metavar="M", help=(
        "checkpoint once M minutes have passed since the last checkpoint (default %(default)g: a crash or SIGKILL "
        "loses at most that much, while writing a checkpoint, seconds for an adapter, under a minute at 1 GB/s "
        "for a 7B full fine-tune's 38 GiB of weights and AdamW state, costs a few percent of the time; the demo "
        "ends sooner; 0: off). Ctrl-C and SIGTERM always checkpoint, after the step in progress"))
    p.add_argument("--resume", help="continue the run in this output folder from its checkpoint, with the same "
                                    "settings, model and data; a finished run exits at once")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="weights/compute dtype (default: bf16 on CUDA, as QLoRA; fp32 on CPU)")
    p.add_argument("--num-workers", type=positive_int, default=default_workers(),
                   help="processes that encode --data (default: this machine's cores, at most 8; here "
                        "%(default)s); the encoding is cached under $XDG_CACHE_HOME/tulu/data")


def build_parser():
    ap = argparse.ArgumentParser(prog="tulu.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sft", help="supervised fine-tuning on Tulu-format conversations")
    training_flags(p, "sft")
    p.add_argument("--data", help="JSONL of {\"messages\": [...]} (default: data/sft_train.jsonl)")
    p.set_defaults(func=cmd_sft)
    p = sub.add_parser("dpo", help="direct preference optimisation on chosen/rejected pairs")
    training_flags(p, "dpo")
    p.add_argument("--data", help="JSONL of {\"chosen\": [...], \"rejected\": [...]} (default: data/prefs_train.jsonl)")
    p.add_argument("--adapter", help="start from this SFT adapter; it is also the reference model")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1, Tulu 2 DPO)")
    p.add_argument("--loss", default="sigmoid", choices=list(dpo.LOSS_TYPES),
                   help="sigmoid: DPO (Tulu 2); dpo_norm: on average log-probs (Tulu 3); ipo (default %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO epsilon (default 0)")
    p.set_defaults(func=cmd_dpo)
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base and write an HF folder")
    p.add_argument("--model", required=True, help="the base model folder")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    p.add_argument("--output", required=True)
    p.add_argument("--qlora", action="store_true", help="quantise the base to NF4 and back first, as the adapter "
                   "was trained (open-instruct merge_lora.py --qlora)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="output dtype (default %(default)s); with --qlora also the dtype the base is quantized "
                        "from, as in training: bf16 on a GPU (open-instruct), fp32 for CPU runs")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("chat", help="talk to a model in the Tulu chat format")
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
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("eval", help="held-out loss, preference accuracy or multiple-choice (MMLU-style) accuracy")
    p.add_argument("--model", help="HF Llama folder (default: the tiny demo model after its SFT)")
    p.add_argument("--adapter", help="PEFT adapter to evaluate on --model; for preference pairs the model "
                                     "without it is the reference")
    p.add_argument("--qlora", action="store_true", help="quantise the base to NF4 first, as a qlora adapter was "
                                                        "trained (default: the base as stored)")
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
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta of the rewards (default 0.1, Tulu 2 DPO)")
    p.add_argument("--loss", default="sigmoid", choices=list(dpo.LOSS_TYPES), help="DPO loss for the loss "
                                                                                  "metric (default %(default)s)")
    p.add_argument("--output", help="also write the results to this JSON file")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.set_defaults(func=cmd_eval, label_smoothing=0.0)
    p = sub.add_parser("exercises", help="write a student copy in which key functions are left to implement, "
                                         "graded by the tests (see its EXERCISES.md)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the copy: new or empty, unless --force")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    p.set_defaults(func=cmd_exercises)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (TuluError, OSError) as e:  # OSError: a missing file, an --output that is a file, a full disk...
        if not isinstance(e, RankError) or args.dist.main:  # every rank has it: rank 0 says it
            print(f"tulu {args.command}: error: {error_text(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # outside the training loop, which saves a checkpoint itself
        print(f"\ntulu {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    exit_after(main)
