"""Chapter 5: the Tulu 2 recipe -- supervised fine-tuning, DPO, merging, chat.

What this file teaches: how the pieces of the earlier chapters become the
training runs of Tulu 2 (Ivison et al. 2023, arXiv 2311.10702): the chat
format and which tokens are learned, batches, the optimiser and learning-rate
schedule of the model cards, gradient accumulation that weighs every token
equally, QLoRA's memory savings (arXiv 2305.14314), DPO's preference loss
(arXiv 2305.18290), checkpoints that resume exactly, and the command line.

Shapes: B batch, T time (tokens), V vocabulary.  Read top to bottom; the
command line is at the bottom.
"""
from __future__ import annotations

import argparse
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
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import dpo
import llama
from llama import TuluError, Tokenizer, load_model, save_model, atomic_write, write_json
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


def parse_line(path: str, n: int, raw: bytes, kind: str):
    """The object on line n of a JSONL file of kind "sft" ({"messages": [...]}) or
    "prefs" ({"chosen": [...], "rejected": [...]}), None for a blank line; other keys
    (dataset, id) are ignored. Problems: TuluError("path:n: ...")."""
    try:
        line = raw.decode("utf-8").strip()
        obj = json.loads(line) if line else None
    except UnicodeDecodeError:
        raise TuluError(f"{path}:{n}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise TuluError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not line:
        return None
    if not isinstance(obj, dict):
        raise TuluError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
    for key in KIND_KEYS[kind]:
        problem = f"missing key {key!r}" if key not in obj else message_problem(obj[key])
        if problem:
            raise TuluError(f"{path}:{n}: {problem if key not in obj else repr(key) + ' ' + problem}")
    return obj


def read_jsonl(path: str, kind: str):
    """Yield (line_number, object) for each non-blank line of a JSONL file (parse_line)."""
    if not os.path.isfile(path):
        raise TuluError(f"{path}: no such file")
    seen = False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            obj = parse_line(path, n, raw, kind)
            if obj is not None:
                seen = True
                yield n, obj
    if not seen:
        raise TuluError(f"{path}: empty")


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


# -----------------------------------------------------------------------------
# The embedded default: a tiny Llama that trains on a laptop CPU in minutes

TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)
PRETRAIN = dict(command="pretrain", method="full", lr=2e-3, max_steps=500, epochs=0, batch_size=16, grad_accum=1,
                warmup_ratio=0.03, max_grad_norm=1.0, weight_decay=0.0, adam_betas=(0.9, 0.999), adam_eps=1e-8,
                seed=0, resume=None, save_every=0,
                device="cpu", dtype=torch.float32)


def cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tulu")


def data_cache_dir():
    return os.path.join(cache_dir(), "data")


def train_tiny_tokenizer(out_dir: str, files, vocab_size: int = 768):
    """Train a BPE sentencepiece model on the chat text of the conversations in
    `files` (markers included, so "<|user|>" costs few tokens; cut at each "</s>",
    which is an id, not text) and write a folder transformers loads as a
    LlamaTokenizer. Settings as Llama 2's trainer_spec: <unk>=0, <s>=1, </s>=2,
    byte fallback, dummy prefix, digits split; "\n" is a token of its own so
    that no token spans the end of a turn. One thread, input in file order: the
    same files give the same bytes."""
    import io
    import sentencepiece as spm
    sentences = [s for path in files for _, obj in read_jsonl(path, "sft")
                 for s in chat_text(obj["messages"]).strip().split("</s>") if s]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>",
        bos_piece="<s>", eos_piece="</s>", user_defined_symbols=["\n"], num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "tokenizer.model"), lambda tmp: pathlib.Path(tmp).write_bytes(model.getvalue()))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer", **special, "pad_token": None, "add_bos_token": True,
        "add_eos_token": False, "legacy": False, "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}})


def tiny_default_model() -> str:
    """Build (once) the demo's base model and return its path: a tiny Llama as a
    real HF folder, with a sentencepiece tokenizer trained on data/, and
    "pretrained" for a minute on the plain text of data/ (no chat markers), so
    that, as with a real base model, it knows the content and SFT teaches it to
    chat. Deterministic on a given machine; rebuilt when data/ changes."""
    import hashlib
    source = os.path.join(DATA, "sft_train.jsonl")
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read() + repr((TINY, PRETRAIN)).encode()).hexdigest()[:10]
    path = os.path.join(cache_dir(), f"tiny-llama-{digest}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    print(f"building the tiny default model in {path} (once, about a minute)")
    tmp = f"{path}.tmp{os.getpid()}"
    train_tiny_tokenizer(tmp, [source])
    tok = Tokenizer(tmp)
    cfg = llama.LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **TINY)
    torch.manual_seed(0)
    model = llama.Llama(cfg)
    for p in model.parameters():  # HF's init: N(0, 0.02) for matrices, ones for norms
        if p.dim() == 2:
            torch.nn.init.normal_(p, 0.0, 0.02)
    docs = [[tok.bos_id] + tok.encode("\n".join(m["content"] for m in obj["messages"])) + [tok.eos_id]
            for _, obj in read_jsonl(source, "sft")]
    train(argparse.Namespace(**PRETRAIN), model, [(d, d) for d in docs], SFTTask(tok.eos_id), tmp)
    save_model(model, tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


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
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def build_policy(args, path):
    """Load the model for training as --method says. full: every weight trains
    (AdamW); lora: a frozen base + LoRA adapters; qlora: the base quantised to
    NF4 while loading, LoRA adapters on top, and paged AdamW (QLoRA Sec. 3)."""
    from lora import add_lora, load_adapter
    model = load_model(path, dtype=args.dtype, device=args.device,
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
    return model


def build_optimizer(args, model):
    from nf4 import PagedAdamW
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=args.lr, betas=tuple(args.adam_betas), eps=args.adam_eps, weight_decay=args.weight_decay)
    if args.method == "qlora":
        return PagedAdamW(params, **kw)
    return torch.optim.AdamW(params, foreach=False, **kw)


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
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                              ignore_index=-100, reduction="sum")
        return nll / denom, {}


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
    out = []
    for chunk, batch in eval_batches(model, pairs, task, args, desc="reference log-probs"):
        with autocast(args):
            rc, rr = dpo.concatenated_logps(model, batch, task.avg)
        out += [p[:4] + (float(c), float(r)) for p, c, r in zip(chunk, rc, rr)]
    return out


def eval_batches(model, examples, task, args, desc):
    """(examples, device batch) in order, the model in eval mode (no dropout)."""
    model.eval()
    for i in tqdm(range(0, len(examples), args.batch_size), desc=desc, leave=False):
        chunk = examples[i:i + args.batch_size]
        yield chunk, {k: v.to(args.device) for k, v in task.collate(chunk).items()}


def autocast(args):
    """bf16 autocast on CUDA when --dtype is bf16 (QLoRA's bf16 compute); fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda" and args.dtype == torch.bfloat16)


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
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(out, step, model, opt, rng, run):
    """out/checkpoint/: trainable weights, optimiser state and RNG after `step`
    completed steps. Written beside the old one and swapped in by rename."""
    from safetensors.torch import save_file
    final, tmp = os.path.join(out, "checkpoint"), os.path.join(out, f"checkpoint.tmp{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, os.path.join(tmp, "trainable.safetensors"))
    tensors = {}
    skeleton = pack({"optimizer": opt.state_dict(), "rng": rng}, tensors)
    save_file(tensors, os.path.join(tmp, "state.safetensors"))
    write_json(os.path.join(tmp, "trainer_state.json"), {"step": step, "run": run, "state": skeleton})
    old = f"{final}.old{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path, model, opt, run) -> int:
    """Restore what save_checkpoint wrote; returns the number of completed steps.
    `run` (method, schedule, batch, seed) must be the one the checkpoint was made
    with, or the resumed run would not continue the same curve."""
    from safetensors.torch import load_file
    ckpt = path if os.path.exists(os.path.join(path, "trainer_state.json")) else os.path.join(path, "checkpoint")
    if not os.path.exists(os.path.join(ckpt, "trainer_state.json")):
        raise TuluError(f"{path}: no checkpoint to resume from (trainer_state.json missing)")
    weights = load_file(os.path.join(ckpt, "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if weights.keys() != params.keys():
        raise TuluError(f"{ckpt}: its trainable weights do not match this model and --method")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        meta = json.load(f)
    changed = [f"{k}: {meta['run'].get(k)} -> {v}" for k, v in run.items() if meta["run"].get(k) != v]
    if changed:
        raise TuluError(f"{ckpt}: the checkpoint was made with other settings ({'; '.join(changed)})")
    state = unpack(meta["state"], load_file(os.path.join(ckpt, "state.safetensors")))
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    print(f"resumed from {ckpt} after step {meta['step']}")
    return meta["step"]


class MetricsLog:
    """metrics.jsonl, one JSON object per step; on resume, later lines are dropped."""

    def __init__(self, out, start_step):
        self.path = os.path.join(out, "metrics.jsonl")
        rows = []
        if start_step and os.path.exists(self.path):
            with open(self.path) as f:
                rows = [r for r in map(json.loads, f) if r["step"] <= start_step]
        self.rows = rows
        atomic_write(self.path, lambda tmp: pathlib.Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def log(self, row):
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
    x0, x1, y1 = min(steps), max(max(steps), min(steps) + 1), max(loss) * 1.05 or 1.0
    X = lambda s: L + (s - x0) / (x1 - x0) * (W - L - R)
    Y = lambda v, top: H - B - v / top * (H - T - B)
    line = lambda vals, top, color: (f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                                     + " ".join(f"{X(s):.1f},{Y(v, top):.1f}" for s, v in zip(steps, vals)) + '"/>')
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
    if "rewards/accuracy" in rows[0]:
        out += [f'<path d="M{W - R},{T} V{H - B}" stroke="black"/>', line([r["rewards/accuracy"] for r in rows], 1.0, "#d62728"),
                f'<text transform="translate({W - 16},{H / 2}) rotate(90)" text-anchor="middle" fill="#d62728">'
                f'rewards/accuracy</text>']
        out += [f'<text x="{W - R + 6}" y="{Y(v, 1.0) + 4:.1f}">{v:.1f}</text>' for v in (0, 0.5, 1.0)]
    return "\n".join(out + ["</svg>\n"])

# -----------------------------------------------------------------------------
# The training loop, shared by sft and dpo


def step_batches(n, step, steps_per_epoch, batch_size, grad_accum, seed):
    """Example indices of each micro-batch of optimiser step `step`. The order of
    epoch e is a permutation seeded by seed + e, so a resumed run sees the same data."""
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    E = batch_size * grad_accum
    chunk = order[i * E:(i + 1) * E]
    return [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]


def train_step(args, model, opt, params, batches, task):
    """One optimiser step over its micro-batches; returns the step's metrics."""
    denom = max(1, sum(task.count(b) for b in batches))
    loss, sums = 0.0, {}
    for b in batches:
        b = {k: v.to(args.device) for k, v in b.items()}
        with autocast(args):
            l, m = task.loss(model, b, denom)
        l.backward()
        loss += l.item()
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
    norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"loss": loss, "grad_norm": float(norm), "tokens": tokens, **{k: v / denom for k, v in sums.items()}}


def train(args, model, examples, task, out):
    """Tulu 2's loop: AdamW (paged for QLoRA), linear warmup and decay, gradient
    accumulation, clipping; tqdm, metrics.jsonl, checkpoints, Ctrl-C and --resume."""
    E = args.batch_size * args.grad_accum
    steps_per_epoch = math.ceil(len(examples) / E)
    total = args.max_steps or args.epochs * steps_per_epoch
    warmup = int(total * args.warmup_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(args, model)
    run = {k: getattr(args, k) for k in ("method", "lr", "batch_size", "grad_accum", "warmup_ratio", "seed")}
    run.update(adam_betas=list(args.adam_betas), adam_eps=args.adam_eps, total_steps=total, examples=len(examples))
    start = load_checkpoint(args.resume, model, opt, run) if args.resume else 0
    log = MetricsLog(out, start)
    title = f"tulu {args.command} --method {args.method}: {os.path.basename(os.path.normpath(args.model if hasattr(args, 'model') else out))}"
    model.train()
    rng, done = rng_state(), start
    bar = tqdm(range(start, total), initial=start, total=total, desc=args.command, dynamic_ncols=True)
    try:
        for step in bar:
            lr = args.lr * linear_schedule(step, warmup, total)
            for g in opt.param_groups:
                g["lr"] = lr
            t0 = time.time()
            idx = step_batches(len(examples), step, steps_per_epoch, args.batch_size, args.grad_accum, args.seed)
            row = train_step(args, model, opt, params, [task.collate([examples[i] for i in c]) for c in idx], task)
            row = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 3), "lr": lr, **row,
                   "tokens_per_s": round(row["tokens"] / (time.time() - t0), 1)}
            log.log(row)
            rng, done = rng_state(), step + 1
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if args.save_every and done % args.save_every == 0 and done < total:
                save_checkpoint(out, done, model, opt, rng, run)
                log.plot(title)
    except KeyboardInterrupt:
        bar.close()
        opt.zero_grad(set_to_none=True)
        save_checkpoint(out, done, model, opt, rng, run)
        log.plot(title)
        print(f"\ninterrupted: {done} steps are saved in {out}/checkpoint; continue with --resume {out}",
              file=sys.stderr)
        sys.exit(130)
    bar.close()
    log.plot(title)
    model.eval()
    return log.rows


# -----------------------------------------------------------------------------
# Commands


def tokenizer_source(adapter, model_dir):
    """The folder whose tokenizer a run uses: the adapter's when it has one (sft and
    dpo write the tokenizer beside the adapter), else the model's."""
    if adapter and any(os.path.exists(os.path.join(adapter, n)) for n in ("tokenizer.model", "tokenizer.json")):
        return adapter
    return model_dir


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
    if args.method == "full":
        save_model(model, out)
        copy_tokenizer(model_dir, out, ("generation_config.json",))
    else:
        save_adapter(model, out, base_model_name_or_path=model_dir)
    copy_tokenizer(tokenizer_source(getattr(args, "adapter", None), model_dir), out)
    print(f"wrote {'model' if args.method == 'full' else 'adapter'}, tokenizer and metrics.jsonl to {out}")


def print_config(args):
    shown = {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
             for k, v in vars(args).items() if k not in ("func",)}
    print("config: " + " ".join(f"{k}={v}" for k, v in shown.items()))


def start_run(args, default_model, default_data):
    """Fill in the defaults (the tiny demo's when there is no --model), print the
    settings, check the model folder, seed. Returns (demo?, tokenizer)."""
    demo = args.model is None
    args.model = args.model or default_model()
    args.data = args.data or os.path.join(DATA, default_data)
    fill_defaults(args, demo)
    print_config(args)
    llama.checkpoint_files(args.model)  # a missing or unusable folder: say so before anything else
    torch.manual_seed(args.seed)
    return demo, Tokenizer(args.model)


def cmd_sft(args):
    demo, tok = start_run(args, tiny_default_model, "sft_train.jsonl")
    examples = load_sft_data(args.data, tok, args.max_seq_length, args.num_workers, data_cache_dir())
    model = build_policy(args, args.model)
    os.makedirs(args.output, exist_ok=True)
    train(args, model, examples, SFTTask(pad_id=tok.eos_id), args.output)
    save_outputs(args, model, args.model, args.output)
    if demo:
        show_answers(model, tok, os.path.join(DATA, "sft_heldout.jsonl"), args.device)


def show_answers(model, tok, path, device, n=4):
    """Print a few held-out prompts with the model's greedy answers."""
    for _, obj in list(read_jsonl(path, "sft"))[:n]:
        msgs = [m for m in obj["messages"] if m["role"] != "assistant"][:2]
        ids = encode_prompt(msgs, tok)
        out = llama.generate(model, ids, max_new_tokens=48, eos_id=tok.eos_id)
        want = next(m["content"] for m in obj["messages"] if m["role"] == "assistant")
        answer = tok.decode([t for t in out if t != tok.eos_id]).strip()
        print(f"\n> {msgs[-1]['content']}\n{answer}    (reference: {want.strip()})")


def tiny_sft_model() -> str:
    """DPO starts from an SFT model: the tiny default after the demo's full SFT,
    built once and cached beside it."""
    base = tiny_default_model()
    path = base.replace("tiny-llama-", "tiny-sft-")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"DPO starts from an SFT model: running the demo SFT once (cached in {path})")
        tmp = f"{path}.tmp{os.getpid()}"
        main(["sft", "--method", "full", "--output", tmp])
        os.replace(tmp, path)
    return path


def cmd_dpo(args):
    demo, tok = start_run(args, tiny_sft_model, "prefs_train.jsonl")
    pairs = load_pref_data(args.data, tok, args.max_seq_length, args.num_workers, data_cache_dir())
    model = build_policy(args, args.model)
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
        before = heldout_preferences(model, held, task, args)
    os.makedirs(args.output, exist_ok=True)
    train(args, model, pairs, task, args.output)
    save_outputs(args, model, args.model, args.output)
    if demo:
        after = heldout_preferences(model, held, task, args)
        print(f"held-out pairs ({heldout}): rewards/accuracy {before['rewards/accuracy']:.2f} -> "
              f"{after['rewards/accuracy']:.2f}, rewards/margin {before['rewards/margin']:.3f} -> "
              f"{after['rewards/margin']:.3f} (at step 0 the policy is the reference: every reward is 0)")


@torch.no_grad()
def heldout_preferences(model, pairs, task, args):
    """DPO's metrics, averaged over held-out pairs."""
    sums = {}
    for _, batch in eval_batches(model, pairs, task, args, desc="held-out pairs"):
        with autocast(args):
            _, m = task.loss(model, batch, 1)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / len(pairs) for k, v in sums.items()}


def cmd_merge(args):
    from lora import load_adapter, merge_lora
    dtype = resolve_dtype(args.dtype, "cpu")
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
    args.model = args.model or tiny_sft_model()
    model = load_model(args.model, dtype=dtype, device=args.device)
    if args.adapter:
        load_adapter(model, args.adapter)
        merge_lora(model, dtype=dtype)
    tok = Tokenizer(tokenizer_source(args.adapter, args.model))
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



def cmd_exercises(args):
    """A student copy with the key bodies blanked, graded by the tests (tests/exercises.py)."""
    from tests.exercises import EXERCISES, make_exercises
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
    ("sft", "demo"): dict(lr=2e-3, epochs=3, warmup_ratio=0.03, max_grad_norm=1.0, batch_size=16, grad_accum=1,
                          max_seq_length=256),
    ("dpo", "demo"): dict(lr=1e-3, epochs=2, warmup_ratio=0.1, max_grad_norm=1.0, batch_size=16, grad_accum=1,
                          max_seq_length=256),
}


def fill_defaults(args, demo):
    """Replace unset (None) flags by the recipe's value; resolve device and dtype."""
    family = "demo" if demo else ("full" if args.method == "full" else "lora")
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
    """'what (default X full [source], Y lora/qlora [source]; Z for the demo)'."""
    r = lambda m: RECIPES[(command, m)][key]
    return (f"{what} (default {r('full')} for full fine-tuning [{SOURCES[(command, 'full')]}], {r('lora')} "
            f"with lora/qlora [{lora_source or SOURCES[(command, 'lora')]}]; {r('demo')} for the tiny demo)")


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
    p.add_argument("--seed", type=int, default=42, help="random seed (default 42, open-instruct's)")
    p.add_argument("--save-every", type=count, default=0, help="checkpoint every N steps (default 0: only on Ctrl-C)")
    p.add_argument("--resume", help="continue from the checkpoint in this output folder")
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
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"tulu {args.command}: error: {msg}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # outside the training loop, which saves a checkpoint itself
        print(f"\ntulu {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
