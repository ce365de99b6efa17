"""The data side of the Tulu 2 recipe: the chat format, its labels, the data files,
and the tiny tokenizer of the embedded demo (to be folded into tulu.py).

What this file teaches: how a conversation becomes the token ids and labels of
supervised fine-tuning in Tulu 2 (Ivison et al. 2023, arXiv 2311.10702), exactly
as open-instruct's `encode_with_messages_format` builds them -- including how
Hugging Face's Llama tokenizer (Llama 2, arXiv 2307.09288) reads the text "</s>"
as the end-of-sequence token, and what it does to the text after it.

Shapes: T time (tokens).  Read top to bottom.
"""
from __future__ import annotations

import json
import os

import sentencepiece as spm

from llama import TuluError

# -----------------------------------------------------------------------------
# The chat format: text

ROLE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
EOS_TEXT = "</s>"  # open-instruct appends tokenizer.eos_token, which is "</s>" for Llama


def chat_text(messages) -> str:
    """The Tulu format, one turn after another (not stripped: open-instruct also
    tokenizes these prefixes of the conversation to find where turns end):

        <|system|>\\n{c}\\n   <|user|>\\n{c}\\n   <|assistant|>\\n{c}</s>\\n

    with each content c stripped of surrounding whitespace."""
    text = ""
    for m in messages:
        if m["role"] not in ROLE_HEADERS:
            raise ValueError(f"unknown role {m['role']!r} (expected system, user or assistant)")
        text += ROLE_HEADERS[m["role"]] + m["content"].strip() + (EOS_TEXT if m["role"] == "assistant" else "") + "\n"
    return text


# -----------------------------------------------------------------------------
# The chat format: tokens, as HF's slow (sentencepiece) LlamaTokenizer makes them

# A serialized sentencepiece ModelProto with these 4 bytes appended reads as the
# same model with normalizer_spec.add_dummy_prefix = False: field 3 of the model
# (normalizer_spec, a message) appears again holding field 3 (add_dummy_prefix)
# = 0, and protobuf merges a repeated message field into the first. This is the
# processor HF's LlamaTokenizer builds when legacy=False.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"
_no_prefix_processors = {}


def sp_without_dummy_prefix(tok) -> spm.SentencePieceProcessor:
    if tok.model_file not in _no_prefix_processors:
        with open(tok.model_file, "rb") as f:
            proto = f.read() + NO_DUMMY_PREFIX
        _no_prefix_processors[tok.model_file] = spm.SentencePieceProcessor(model_proto=proto)
    return _no_prefix_processors[tok.model_file]


def special_tokens(tok) -> dict:
    """Text that HF's tokenizer turns into one id wherever it appears, even
    inside a message: "<unk>", "<s>", "</s>"."""
    return {tok.sp.id_to_piece(i): i for i in (tok.sp.unk_id(), tok.bos_id, tok.eos_id) if i >= 0}


def split_special(text: str, specials) -> list[str]:
    """"a</s>b" -> ["a", "</s>", "b"]: the text between special tokens, and the
    tokens themselves (empty pieces dropped)."""
    out, start, i = [], 0, 0
    while i < len(text):
        hit = next((s for s in specials if text.startswith(s, i)), None)
        if hit:
            out += [text[start:i], hit]
            i = start = i + len(hit)
        else:
            i += 1
    return [c for c in out + [text[start:]] if c]


def tokenize(text: str, tok) -> list[int]:
    """Ids of `text` (no BOS) as HF's slow LlamaTokenizer gives them: special
    tokens are cut out first and each piece of text between them is encoded
    on its own. The two modes differ in what follows a special token:

    legacy=True:  every piece gets sentencepiece's dummy prefix "▁"
                  ("</s>\\n<|user|>" -> "</s>", "▁", "\\n", ...);
    legacy=False: only the start of the text gets "▁"; a piece after a special
                  token is encoded as it is ("</s>", "\\n", ...), except that a
                  piece starting with a space keeps it as "▁" (HF encodes
                  "<unk>" + piece and drops the pieces of "<unk>")."""
    specials = special_tokens(tok)
    if tok.legacy or not text:
        sp, chunks = tok.sp, split_special(text, specials)
        pieces = [p for c in chunks for p in ([c] if c in specials else sp.encode(c, out_type=str))]
    else:
        sp = sp_without_dummy_prefix(tok)
        unk = tok.sp.id_to_piece(tok.sp.unk_id())
        n_unk = len(sp.encode(unk))
        pieces = []
        for c in split_special("▁" + text.replace("▁", " "), specials):
            if c in specials:
                pieces.append(c)
            elif c.startswith(("▁", " ")):  # so that no sentencepiece version drops the leading space
                pieces += sp.encode(unk + c, out_type=str)[n_unk:]
            else:
                pieces += sp.encode(c, out_type=str)
        if len(pieces) > 1 and pieces[0] == "▁" and pieces[1] in specials:
            pieces = pieces[1:]  # text that starts with a special token gets no "▁"
    return [specials[p] if p in specials else sp.piece_to_id(p) for p in pieces]


def tokenize_bos(text: str, tok, max_seq_length: int) -> list[int]:
    """tokenizer(text, max_length=max_seq_length, truncation=True): BOS, the
    text's ids, cut on the right to max_seq_length."""
    return ([tok.bos_id] + tokenize(text, tok))[:max_seq_length]


def encode_messages(messages, tokenizer, max_seq_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation, as open-instruct's
    encode_with_messages_format (Tulu 2) makes them: the chat text, stripped,
    tokenized with BOS and truncated on the right; labels are the ids with -100
    on every system and user turn and on the "<|assistant|>\\n" that follows
    one. So the model learns the assistant replies, their "</s>" and, after a
    non-final "</s>", the tokens of "\\n" as the prefix ending in "</s>\\n"
    tokenizes them (Llama 2: "\\n"; with legacy=True "▁", "\\n").

    Where a turn ends is found as open-instruct does: by tokenizing the text of
    the conversation up to that turn on its own, so a token that spans a turn
    boundary in the full text is counted the way the prefix tokenizes.
    Consequences kept on purpose: BOS is learned when the conversation starts
    with an assistant turn, and the header of an assistant turn that follows
    another assistant turn is learned. Unknown role -> ValueError."""
    if not messages:
        raise ValueError("no messages")
    ids = tokenize_bos(chat_text(messages).strip(), tokenizer, max_seq_length)
    labels = list(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if i == 0 else len(tokenize_bos(chat_text(messages[:i]), tokenizer, max_seq_length))
        header = ROLE_HEADERS["assistant"] if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant" else ""
        end = len(tokenize_bos(chat_text(messages[:i + 1]) + header, tokenizer, max_seq_length))
        labels[start:end] = [-100] * len(labels[start:end])
        if end >= max_seq_length:
            break
    return ids, labels


def encode_prompt(messages, tokenizer) -> list[int]:
    """Ids of a conversation that ends with a user turn, followed by the
    "<|assistant|>\\n" header, for the model to write the answer: BOS and the
    text tokenized exactly as encode_messages tokenizes the same text in
    training. (open-instruct's evaluation writes "<s>" into the prompt text
    instead; with legacy=False, HF then encodes the first "<|user|>" without
    "▁", unlike in training. We keep training's tokens.)"""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user turn")
    return tokenize_bos(chat_text(messages) + ROLE_HEADERS["assistant"], tokenizer, 10**9)


# -----------------------------------------------------------------------------
# Data files: JSONL in the Tulu 2 formats

KIND_KEYS = {"sft": ("messages",), "prefs": ("chosen", "rejected")}


def message_problem(messages) -> str | None:
    """What is wrong with a list of messages, or None."""
    if not isinstance(messages, list) or not messages:
        return "must be a non-empty list of messages"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {j} must be an object with string 'role' and 'content'"
        if m["role"] not in ROLE_HEADERS:
            return f"message {j}: unknown role {m['role']!r} (expected system, user or assistant)"
    return None


def read_jsonl(path: str, kind: str):
    """Yield (line_number, object) for each non-blank line of a JSONL file of
    kind "sft" ({"messages": [...]}) or "prefs" ({"chosen": [...], "rejected":
    [...]}); other keys are ignored. Problems raise TuluError("path:line: ...")."""
    if not os.path.isfile(path):
        raise TuluError(f"{path}: no such file")
    seen = False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                obj = json.loads(line)
            except UnicodeDecodeError:
                raise TuluError(f"{path}:{n}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise TuluError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TuluError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            for key in KIND_KEYS[kind]:
                if key not in obj:
                    raise TuluError(f"{path}:{n}: missing key {key!r}")
                problem = message_problem(obj[key])
                if problem:
                    raise TuluError(f"{path}:{n}: {key!r} {problem}")
            seen = True
            yield n, obj
    if not seen:
        raise TuluError(f"{path}: empty")


# -----------------------------------------------------------------------------
# The tiny tokenizer of the embedded default


def tokenizer_sentences(files) -> list[str]:
    """The text the tiny tokenizer learns from: each conversation's chat text
    (markers included, so "<|user|>" comes out in few tokens), cut at each
    "</s>", which is never text but the EOS id. SFT or preference files."""
    out = []
    for path in files:
        for _, obj in read_jsonl(path, file_kind(path)):
            for key in ("messages", "chosen", "rejected"):
                if key in obj:
                    out += [s for s in chat_text(obj[key]).strip().split(EOS_TEXT) if s]
    return out


def file_kind(path: str) -> str:
    """"prefs" when the first non-blank line has a "chosen" key, else "sft"
    (read_jsonl then says what is wrong, if anything)."""
    if not os.path.isfile(path):
        return "sft"
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"{}")
    try:
        obj = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "sft"
    return "prefs" if isinstance(obj, dict) and "chosen" in obj else "sft"


def train_tiny_tokenizer(out_dir: str, files, vocab_size: int = 768):
    """Train a BPE sentencepiece model on the conversations in `files` and write
    it as a folder transformers loads as a LlamaTokenizer: tokenizer.model,
    tokenizer_config.json, special_tokens_map.json. Trained like Llama 2's
    tokenizer (its trainer_spec): <unk>=0, <s>=1, </s>=2, byte fallback, a dummy
    prefix, digits split, identity normalization, whitespace kept; "\n" is one
    token. One thread and the input in file order: same files, same bytes."""
    import io
    from llama import write_json, atomic_write
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_sentences(files)), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, character_coverage=1.0,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, max_sentencepiece_length=16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        # a newline is a token of its own, so that no token spans the end of a turn (the
        # prompt then ends where a training answer starts); Llama 2 gets the same from
        # byte fallback, never having seen a newline in training
        user_defined_symbols=["\n"],
        num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    os.makedirs(out_dir, exist_ok=True)

    def write_model(tmp):
        with open(tmp, "wb") as f:
            f.write(model.getvalue())
    atomic_write(os.path.join(out_dir, "tokenizer.model"), write_model)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer", **special, "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "legacy": False,  # as Llama 2's and Tulu 2's configs
        "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}})
