"""Data at scale. The Tulu v2 SFT mixture is ~326k conversations and hundreds of millions
of tokens, and tulu.py's encode_messages tokenizes each one again up to the end of every
turn, as open-instruct does. Four things make it cheap:

- encode_messages_fast gives the same ids and labels from one pass: a tokenizer cuts a text
  at its special tokens and encodes the pieces between them on their own, so the encoding
  of any prefix is read off the spans of the whole text (Prefixes);
- worker processes encode a batch of whole lines at a time; they start fresh (forkserver,
  or spawn), never as forks of this process, whose other threads (a compile pool, tqdm's
  monitor) may hold a lock that a fork would copy held forever;
- the examples are one flat int32 tensor (Examples: 8 bytes a token with its label, where
  two lists of Python ints take about 43);
- they are cached under a hash of everything they depend on, for the next run and --resume.

Each line is checked once, by read_jsonl, with file:line errors. tulu.py hands its chat
format in as a ChatFormat (machinery never imports tulu.py), whose `row` encodes QLoRA's
rows ({"input", "output"} or {"text"}), which `sft` reads beside conversations.
"""
import array
import bisect
import contextlib
import functools
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import pathlib
import sys
import unicodedata
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import dpo
import llama
from llama import TuluError, atomic_write

# -----------------------------------------------------------------------------
# Reading data files: one JSON object a line, checked with the file and line

KIND_KEYS = {"sft": ("messages",), "prefs": ("chosen", "rejected")}  # a file's kind -> its rows' keys
ROW_OF = {"sft": ("a conversation", "sft"), "prefs": ("a preference pair", "dpo")}  # -> (a row, its command)
ROW_KEYS = (("input", "output"), ("text",))  # QLoRA's rows, which sft reads beside conversations


def row_keys(obj):
    """The keys of the QLoRA row that obj is, or None."""
    return next((keys for keys in ROW_KEYS if all(k in obj for k in keys)), None)


def check_row(where: str, obj: dict, kind: str, roles=None):
    """TuluError("where: ...") unless obj is a row of `kind`: lists of messages with a string
    role (one of `roles`; None: any) and content, a preference pair (dpo.check_pair), or for
    sft a QLoRA row of strings. The one check of a row: encoding trusts it."""
    keys = row_keys(obj)
    if kind == "sft" and "messages" not in obj and keys:
        if not all(isinstance(obj[k], str) for k in keys):
            raise TuluError(f"{where}: {' and '.join(map(repr, keys))} must be strings")
        return
    names = lambda k: " and ".join(map(repr, KIND_KEYS[k]))
    other = "prefs" if kind == "sft" else "sft"
    if all(k in obj for k in KIND_KEYS[other]) and not any(k in obj for k in KIND_KEYS[kind]):
        raise TuluError(f"{where}: {ROW_OF[other][0]} ({names(other)}): this file is for `tulu.py "
                        f"{ROW_OF[other][1]}` ({ROW_OF[kind][1]} reads {names(kind)})")
    for key in KIND_KEYS[kind]:
        messages, at = obj.get(key), f"{where}: {key!r}"
        if key not in obj:
            raise TuluError(f"{where}: missing key {key!r}")
        if not isinstance(messages, list) or not messages:
            raise TuluError(f"{at} must be a non-empty list of messages")
        for j, m in enumerate(messages):
            if not (isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))):
                raise TuluError(f"{at} message {j} must be an object with string 'role' and 'content'")
            if roles is not None and m["role"] not in roles:
                expected = " or ".join(", ".join(roles).rsplit(", ", 1))  # "system, user or assistant"
                raise TuluError(f"{at} message {j}: unknown role {m['role']!r} (expected {expected})")
    if kind == "prefs" and (problem := dpo.check_pair(obj["chosen"], obj["rejected"])):
        raise TuluError(f"{where}: {problem}")


def read_jsonl(path: str, kind=None, roles=None, batch=None):
    """Yield (line number, object) for each non-blank line of a JSONL file, or of its `batch`
    of whole lines (offset, size, first line number): a row of `kind` (check_row) or, with no
    kind, any object."""
    if not os.path.isfile(path):
        raise TuluError(f"{path}: no such file")
    offset, size, first = batch or (0, -1, 1)
    seen = False
    with open(path, "rb") as f:
        f.seek(offset)
        for n, raw in enumerate(io.BytesIO(f.read(size)) if batch else f, start=first):
            try:
                obj = json.loads(line) if (line := raw.decode("utf-8").strip()) else None
            except UnicodeDecodeError:
                raise TuluError(f"{path}:{n}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise TuluError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if line and not isinstance(obj, dict):
                raise TuluError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            if obj is not None and kind is not None:
                check_row(f"{path}:{n}", obj, kind, roles)
            if obj is not None:
                seen = True
                yield n, obj
    if not seen and not batch:
        raise TuluError(f"{path}: empty")


read_objects = read_jsonl  # with no kind: any objects (eval tells the kind by the first one's keys)

# -----------------------------------------------------------------------------
# The fast chat encoding: encode_messages' ids and labels from one pass


class ChatFormat(NamedTuple):
    """What tulu.py hands in: chat_text(messages, eos), eos_text(tokenizer), ROLE_HEADERS,
    encode_pair(chosen, rejected, tok, max_seq_length, encode) and row(row, tok), QLoRA's
    rows' encoder (encode_instruction, with the run's lengths as keywords)."""
    text: Callable
    eos: Callable
    headers: dict
    pair: Callable
    row: Callable


class Prefixes:
    """tokenizer.encode(text[:b], bos=True)[:limit] for any b, from one pass over
    tokenizer.spans(text): the ids of the spans that end by b, then those of the piece
    that b cuts, encoded alone. Spans are encoded when needed, none past `limit` tokens."""

    def __init__(self, tokenizer, text: str, limit: int):
        self.tok, self.text, self.limit, self.spans = tokenizer, text, limit, tokenizer.spans(text)
        self.ids = tokenizer.encode("", bos=True)  # BOS (or nothing), then each span's ids
        self.seen = [(0, len(self.ids), True)]  # (end, len(self.ids) after it, special?) of BOS and each span

    def cut(self, b: int) -> tuple[int, list[int]]:
        """(n, tail): tokenizer.encode(text[:b], bos=True) is self.ids[:n] + tail (to `limit` tokens)."""
        while self.seen[-1][0] < b and len(self.ids) < self.limit:
            _, end, ids, special = next(self.spans)
            self.ids += ids
            self.seen.append((end, len(self.ids), special))
        k = bisect.bisect_left(self.seen, b, key=lambda s: s[0])  # the span that holds text[b - 1]
        if k == len(self.seen):  # the spans before b make `limit` tokens already
            return self.seen[-1][1], []
        (start, before, _), (end, after, special) = self.seen[k - 1], self.seen[k]
        if end == b:  # b = 0 too: BOS's
            return after, []
        if special:  # b inside a special token: no shortcut (never in a chat text)
            return 0, self.tok.encode(self.text[:b], bos=True)
        return before, self.tok.encode_piece(self.text[start:b], start == 0)

    def length(self, b: int) -> int:
        n, tail = self.cut(b)
        return min(n + len(tail), self.limit)


def encode_messages_fast(messages, tokenizer, max_seq_length: int, chat: ChatFormat):
    """tulu.py's encode_messages, the same ids and labels, with every prefix's length
    read off one encoding (Prefixes). Each answer ends with the EOS token, a special
    token, so a prefix re-encodes at most the turns since the last answer."""
    turns = [chat.text([m], chat.eos(tokenizer)) for m in messages]
    text, at = "".join(turns), [0, *itertools.accumulate(map(len, turns))]  # at[i]: where turn i starts
    prefix = Prefixes(tokenizer, text, max_seq_length)
    n, tail = prefix.cut(len(text.rstrip()))  # text.strip(): it begins with a role header
    ids = (prefix.ids[:n] + tail)[:max_seq_length]
    labels = list(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if i == 0 else prefix.length(at[i])
        header = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"  # masked too
        end = prefix.length(at[i + 1] + header * len(chat.headers["assistant"]))
        labels[start:end] = [-100] * len(labels[start:end])
        if end >= max_seq_length:
            break
    return ids, labels


# -----------------------------------------------------------------------------
# Flat examples


class Examples:
    """Examples of `width` int32 sequences each (ids, labels; a pair's chosen, then rejected)
    end to end in `tokens`: sequence j is tokens[offsets[j]:offsets[j + 1]]. examples[i]
    is the tuple of those views (no copy), examples[a:b] a list of them."""

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor, width: int):
        self.tokens, self.offsets, self.width = tokens, offsets, width

    def __len__(self):
        return (len(self.offsets) - 1) // self.width

    def __getitem__(self, i):  # iterating calls it with 0, 1, ... up to the IndexError
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        o = self.offsets[i * self.width:(i + 1) * self.width + 1].tolist()
        return tuple(self.tokens[a:b] for a, b in zip(o, o[1:]))

    def tolist(self):
        return [tuple(s.tolist() for s in e) for e in self]


def example_lengths(examples) -> list[int]:
    """Each example's padded length in a batch: its longest sequence (a pair's too)."""
    if isinstance(examples, Examples):
        return (examples.offsets[1:] - examples.offsets[:-1]).view(-1, examples.width).max(1).values.tolist()
    return [max(map(len, e[:4:2])) for e in examples]  # ids, or chosen and rejected ids


# -----------------------------------------------------------------------------
# Worker processes, each a batch of whole lines of the file at a time

BATCH_BYTES = 1 << 20  # of the data file a worker encodes at a time


def scan_file(path: str):
    """One pass over a data file: its sha256, and [(offset, size, first line number)] of
    batches of whole lines of about BATCH_BYTES (at least one)."""
    h, batches, offset, line = hashlib.sha256(), [], 0, 1
    with open(path, "rb") as f:
        while block := f.read(BATCH_BYTES) + f.readline():  # to the end of a line
            h.update(block)
            batches.append((offset, len(block), line))
            offset, line = offset + len(block), line + block.count(b"\n")
    return h.hexdigest(), batches or [(0, 0, 1)]


class BatchEncoder:
    """What a worker runs: a batch of lines -> (its examples' sequences end to end and their
    lengths, int32 arrays; the number of non-blank lines), or TuluError("path:line: ...").
    An example with nothing left to learn is dropped (open-instruct drops those too)."""
    worker = None  # in a worker process, its BatchEncoder: unpickled once (with its word cache)

    def __init__(self, path, kind, tok, max_seq_length, chat: ChatFormat):
        self.path, self.kind, self.tok, self.max_seq_length, self.chat = path, kind, tok, max_seq_length, chat

    def example(self, obj):
        encode, tok = functools.partial(encode_messages_fast, chat=self.chat), self.tok
        if self.kind == "prefs":
            return self.chat.pair(obj["chosen"], obj["rejected"], tok, self.max_seq_length, encode)
        ids, labels = (encode(obj["messages"], tok, self.max_seq_length) if "messages" in obj
                       else self.chat.row(obj, tok))
        return (ids, labels) if any(label != -100 for label in labels[1:]) else None

    def __call__(self, batch):
        tokens, lengths, read = array.array("i"), array.array("i"), 0
        for n, obj in read_jsonl(self.path, self.kind, self.chat.headers, batch):
            read += 1
            try:
                example = self.example(obj) or ()
            except ValueError as e:  # the tokenizer names no EOS token
                raise TuluError(f"{self.path}:{n}: {e}") from None
            tokens.extend(itertools.chain(*example))
            lengths.extend(map(len, example))
        return tokens, lengths, read

    def start(self):  # a worker process's first call
        BatchEncoder.worker = self

    @staticmethod
    def run(batch):
        return BatchEncoder.worker(batch)


def default_workers() -> int:
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)


def worker_context():
    """Fresh processes (forkserver; spawn where there is none), not forks of this one with
    its threads' locks (a run once stalled ten minutes on one)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])  # imported once, by the server: torch, this file
    return context


def encode_file(encoder: BatchEncoder, batches, workers: int):
    """(Examples, non-blank lines read): the batches encoded in file order by up to `workers`
    worker processes (or this one); the pool ends when the last is read, or at an error."""
    workers = min(workers, len(batches))
    pool = worker_context().Pool(workers, encoder.start) if workers > 1 else None
    with pool or contextlib.nullcontext():
        done = pool.imap(BatchEncoder.run, batches) if pool else map(encoder, batches)
        tokens, lengths, read = zip(*tqdm(done, total=len(batches), leave=False, unit=" MiB",
                                          desc=f"encoding {os.path.basename(encoder.path)}"))
    flat = lambda arrays: torch.from_numpy(np.concatenate([np.frombuffer(a, np.int32) for a in arrays]))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), flat(lengths).cumsum(0)])
    return Examples(flat(tokens), offsets, 2 * len(KIND_KEYS[encoder.kind])), sum(read)


# -----------------------------------------------------------------------------
# A cache of the encoding, named by a hash of everything it depends on


def cache_file(folder, digest, encoder: BatchEncoder) -> str:
    """The cache file of a data file's encoding, named by a hash of everything the examples
    depend on: the file's sha256, its kind, --max-seq-length (and QLoRA rows' lengths), the
    tokenizer's files and settings, and the code that encodes (llama.py, this file, the chat
    format's tulu.py, sentencepiece's and Unicode's versions); a change to any of them misses."""
    import sentencepiece
    tok, rows = encoder.tok, getattr(encoder.chat.row, "keywords", None)  # QLoRA rows' lengths
    settings = [digest, encoder.kind, encoder.max_seq_length, getattr(tok, "legacy", None),
                sentencepiece.__version__, unicodedata.unidata_version, rows]
    h = hashlib.sha256(json.dumps(settings).encode())
    code = (llama.__file__, __file__, encoder.chat.text.__code__.co_filename)
    for f in (tok.file, os.path.join(tok.dir, "tokenizer_config.json"), *code):
        h.update(pathlib.Path(f).read_bytes() if os.path.exists(f) else b"-")
    name = f"{os.path.basename(encoder.path)}.{encoder.kind}.{h.hexdigest()[:32]}.safetensors"
    return os.path.join(folder, name)


def cached(file, encode) -> tuple:
    """(Examples, lines read, whether they were cached) from `file`, else from encode(), then
    written to `file` by rename. A file missing or damaged is encoded again; one that cannot
    be written (a read-only folder, a full disk) costs the next run the encoding."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file
    if file:
        with contextlib.suppress(SafetensorError, OSError):
            t = load_file(file)
            return Examples(t["tokens"], t["offsets"], int(t["width"])), int(t["read"]), True
    examples, read = encode()
    tensors = {"tokens": examples.tokens, "offsets": examples.offsets, "width": torch.tensor(examples.width),
               "read": torch.tensor(read)}
    try:
        if file and len(examples):
            os.makedirs(os.path.dirname(file), exist_ok=True)
            atomic_write(file, lambda tmp: save_file(tensors, tmp))
    except OSError as e:
        print(f"tulu: could not cache the encoded data in {file} ({e.strerror or e})", file=sys.stderr)
    return examples, read, False


def load_examples(path, kind, tok, max_seq_length, chat: ChatFormat, workers=1, cache=None) -> Examples:
    """The examples of a data file of `kind` ("sft" or "prefs"), encoded by `workers`
    processes, or read back from the folder `cache` (None: no cache) when encoded before
    with the same everything (cache_file)."""
    if not os.path.isfile(path):
        raise TuluError(f"{path}: no such file")
    digest, batches = scan_file(path)
    encoder = BatchEncoder(path, kind, tok, max_seq_length, chat)
    file = cache and cache_file(cache, digest, encoder)
    examples, read, found = cached(file, lambda: encode_file(encoder, batches, workers))
    what, why, none = {"sft": ("conversations", "nothing left to learn",
                               "no conversation with an assistant turn to learn from"),
                       "prefs": ("preference pairs", "answer truncated away", "no pair left: every answer "
                                 f"is truncated away at --max-seq-length {max_seq_length}")}[kind]
    if not read:
        raise TuluError(f"{path}: empty")
    dropped = f" ({read - len(examples)} dropped: {why})" if read > len(examples) else ""
    print(f"{path}: {len(examples)} {what}{dropped}" + (f", encoded before ({file})" if found else ""))
    if not len(examples):
        raise TuluError(f"{path}: {none}")
    return examples
