"""Tests for tulu.py's data side: the Tulu chat format against open-instruct's
encode_with_messages_format run with HF's slow LlamaTokenizer (golden files from
tests/make_fixtures.py, area "chat"), the JSONL readers, the sample data and the
tiny tokenizer.

The Llama 2 tokenizer.model is not in the repository: point
$TULU_LLAMA2_TOKENIZER at a copy (karpathy/llama2.c has one) to run those tests.
"""
import hashlib
import importlib.util
import json
import os

import pytest

import llama
import tulu
from machinery import demo
from llama import TuluError
from machinery import data

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "chat")
DATA = os.path.join(os.path.dirname(HERE), "data")
TINY = os.path.join(FIX, "tiny_tokenizer")


def load_expected(tag):
    with open(os.path.join(FIX, f"{tag}_expected.json")) as f:
        return json.load(f)


def llama2_model_file():
    path = os.environ.get("TULU_LLAMA2_TOKENIZER")
    if not path:
        pytest.skip("TULU_LLAMA2_TOKENIZER is not set (path to Llama 2's tokenizer.model, not shipped here)")
    if not os.path.isfile(path):
        pytest.skip(f"TULU_LLAMA2_TOKENIZER={path}: no such file")
    with open(path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != load_expected("llama2")["tokenizer_sha256"]:
            pytest.fail(f"{path} is not the Llama 2 tokenizer.model the fixtures were made with")
    return path


def tokenizer_and_modes(tag):
    model_file = os.path.join(TINY, "tokenizer.model") if tag == "tiny" else llama2_model_file()
    return model_file, load_expected(tag)


# -----------------------------------------------------------------------------
# The chat format against open-instruct + HF's slow tokenizer


@pytest.mark.parametrize("tag", ["tiny", "llama2"])
def test_encode_messages_matches_open_instruct(tag):
    model_file, ref = tokenizer_and_modes(tag)
    for mode in ref["modes"]:
        tok = llama.Tokenizer(model_file, legacy=mode["legacy"])
        for case in mode["cases"]:
            msgs = ref["conversations"][case["name"]]
            ids, labels = tulu.encode_messages(msgs, tok, case["max_seq_length"])
            where = (case["name"], case["max_seq_length"], f"legacy={mode['legacy']}")
            assert ids == case["input_ids"], where
            assert labels == case["labels"], where


@pytest.mark.parametrize("tag", ["tiny", "llama2"])
def test_encode_prompt_matches_hf_tokenizer(tag):
    model_file, ref = tokenizer_and_modes(tag)
    for mode in ref["modes"]:
        tok = llama.Tokenizer(model_file, legacy=mode["legacy"])
        for p in mode["prompts"]:
            msgs = ref["conversations"][p["name"]][:p["n_messages"]]
            assert tulu.encode_prompt(msgs, tok) == p["input_ids"], (p["name"], mode["legacy"])


@pytest.mark.parametrize("tag", ["tiny", "llama2"])
def test_tokenize_matches_hf_slow_tokenizer(tag):
    model_file, ref = tokenizer_and_modes(tag)
    for mode in ref["modes"]:
        tok = llama.Tokenizer(model_file, legacy=mode["legacy"])
        for t in mode["texts"]:
            assert tok.encode(t["text"]) == t["ids"], (t["text"], mode["legacy"])


def test_tokenize_text_after_eos_legacy_vs_not():
    """The crux: legacy=True gives the text after "</s>" sentencepiece's dummy
    prefix "▁", legacy=False does not. Text without special tokens is plain
    sentencepiece either way."""
    tok = llama.Tokenizer(TINY)
    new = llama.Tokenizer(TINY, legacy=False).encode("x</s>y")
    old = llama.Tokenizer(TINY, legacy=True).encode("x</s>y")
    assert old == tok.encode("x") + [tok.eos_id] + tok.encode("y")  # "y" as if it began a text: "▁y"
    assert new == tok.encode("x") + [tok.eos_id] + [tok.sp.piece_to_id("y")]  # "y" as it is
    for legacy in (True, False):
        assert llama.Tokenizer(TINY, legacy=legacy).encode("plain text") == tok.sp.encode("plain text")


def test_sp_without_dummy_prefix_drops_the_leading_space_piece():
    tok = llama.Tokenizer(TINY)
    sp = tok.sp_no_prefix()
    assert sp.encode("hello", out_type=str)[0][0] != "▁"
    assert tok.sp.encode("hello", out_type=str)[0][0] == "▁"
    assert sp.get_piece_size() == tok.vocab_size


# -----------------------------------------------------------------------------
# The chat format: invariants a student can check by hand


def learned(ids, labels):
    return [i for i, l in zip(ids, labels) if l != -100]


def test_encode_messages_learns_answers_and_eos_only():
    tok = llama.Tokenizer(TINY)
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "2 + 2 = 4"}]
    ids, labels = tulu.encode_messages(msgs, tok, 512)
    assert ids[0] == tok.bos_id and labels[0] == -100
    assert all(l in (-100, i) for i, l in zip(ids, labels))  # a label is its input id or masked
    got = learned(ids, labels)
    assert got[-1] == tok.eos_id and tok.decode(got[:-1]) == "2 + 2 = 4"
    assert ids == [tok.bos_id] + tok.encode(tulu.chat_text(msgs).strip())


def test_an_empty_conversation_is_refused():
    """open-instruct's encode_with_messages_format raises on an empty messages field; without the
    check the BOS alone would come back as a learned label."""
    with pytest.raises(ValueError, match="no messages"):
        tulu.encode_messages([], llama.Tokenizer(TINY), 64)


def test_encode_messages_strips_contents_and_text():
    tok = llama.Tokenizer(TINY)
    clean = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    padded = [{"role": "user", "content": "  hi\n"}, {"role": "assistant", "content": "\nhello  "}]
    assert tulu.encode_messages(padded, tok, 512) == tulu.encode_messages(clean, tok, 512)
    assert tulu.chat_text(clean).strip() == "<|user|>\nhi\n<|assistant|>\nhello</s>"


def test_encode_messages_truncates_on_the_right():
    tok = llama.Tokenizer(TINY)
    msgs = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."}]
    full_ids, full_labels = tulu.encode_messages(msgs, tok, 4096)
    for n in (1, 5, len(full_ids) - 1):
        ids, labels = tulu.encode_messages(msgs, tok, n)
        assert ids == full_ids[:n] and labels == full_labels[:n]


def test_encode_messages_unknown_role_is_a_value_error():
    tok = llama.Tokenizer(TINY)
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        tulu.encode_messages([{"role": "bot", "content": "x"}], tok, 16)


def test_encode_prompt_is_the_training_text_up_to_the_answer():
    """The prompt is the conversation's chat text plus the assistant header,
    tokenized as in training; generation continues from there."""
    tok = llama.Tokenizer(TINY)
    msgs = [{"role": "user", "content": "Spell the word \"cat\"."}]
    ids = tulu.encode_prompt(msgs, tok)
    assert ids == [tok.bos_id] + tok.encode("<|user|>\nSpell the word \"cat\".\n<|assistant|>\n")
    with pytest.raises(ValueError):
        tulu.encode_prompt(msgs + [{"role": "assistant", "content": "c-a-t"}], tok)


# -----------------------------------------------------------------------------
# Tokenizer.legacy comes from tokenizer_config.json


def test_tokenizer_legacy_read_from_tokenizer_config(tmp_path):
    with open(os.path.join(TINY, "tokenizer.model"), "rb") as f:
        model = f.read()
    for value, want in ((True, True), (False, False), (None, False)):
        d = tmp_path / f"tok_{value}"
        d.mkdir()
        (d / "tokenizer.model").write_bytes(model)
        if value is not None:
            (d / "tokenizer_config.json").write_text(json.dumps({"legacy": value}))
        assert llama.Tokenizer(str(d)).legacy is want
        assert llama.Tokenizer(str(d / "tokenizer.model")).legacy is want
    (tmp_path / "tok_True" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TuluError, match="tokenizer_config.json"):
        llama.Tokenizer(str(tmp_path / "tok_True"))


# -----------------------------------------------------------------------------
# read_jsonl


def write(tmp_path, text, name="d.jsonl"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


SFT_LINE = '{"dataset": "x", "id": 7, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'


def test_read_jsonl_yields_line_numbers_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, SFT_LINE + "\n\n" + SFT_LINE + "\n")
    got = list(data.read_jsonl(path, "sft"))
    assert [n for n, _ in got] == [1, 3]
    assert got[0][1]["messages"][1] == {"role": "assistant", "content": "b"}


@pytest.mark.parametrize("line, problem", [
    ('{"messages": [', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"conversation": []}', "missing key 'messages'"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user"}]}', "message 0 must be an object with string 'role' and 'content'"),
    ('{"messages": ["hi"]}', "message 0 must be an object"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}', "message 1: unknown role 'bot'"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, problem):
    path = write(tmp_path, SFT_LINE + "\n" + line + "\n")
    with pytest.raises(TuluError) as e:
        list(data.read_jsonl(path, "sft", tulu.ROLE_HEADERS))  # roles: the chat format's (the encoder's check)
    assert str(e.value).startswith(f"{path}:2: ") and problem in str(e.value)
    assert "\n" not in str(e.value)


def test_read_jsonl_empty_and_missing_files(tmp_path):
    for text in ("", "\n  \n"):
        path = write(tmp_path, text)
        with pytest.raises(TuluError, match=r": empty$"):
            list(data.read_jsonl(path, "sft"))
    with pytest.raises(TuluError, match="no such file"):
        list(data.read_jsonl(str(tmp_path / "nope.jsonl"), "sft"))


def test_read_jsonl_not_utf8(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(SFT_LINE.encode() + b"\n\xff\xfe\n")
    with pytest.raises(TuluError, match=r"bad.jsonl:2: not UTF-8"):
        list(data.read_jsonl(str(p), "sft"))


def test_read_jsonl_prefs(tmp_path):
    conv = '[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]'
    path = write(tmp_path, f'{{"chosen": {conv}, "rejected": {conv}}}\n{{"chosen": {conv}}}\n')
    it = data.read_jsonl(path, "prefs")
    assert next(it)[0] == 1
    with pytest.raises(TuluError, match=r":2: missing key 'rejected'"):
        next(it)


# -----------------------------------------------------------------------------
# The sample data sets in data/


def data_file(name):
    return os.path.join(DATA, name)


def test_read_jsonl_reads_the_sample_data():
    sizes = {name: len(list(data.read_jsonl(data_file(name), kind)))
             for name, kind in (("sft_train.jsonl", "sft"), ("sft_heldout.jsonl", "sft"),
                                ("prefs_train.jsonl", "prefs"), ("prefs_heldout.jsonl", "prefs"))}
    spec = importlib.util.spec_from_file_location("make_data", data_file("make_data.py"))
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    assert sizes == {"sft_train.jsonl": make_data.N_SFT_TRAIN, "sft_heldout.jsonl": make_data.N_SFT_HELDOUT,
                     "prefs_train.jsonl": make_data.N_PREFS_TRAIN, "prefs_heldout.jsonl": make_data.N_PREFS_HELDOUT}


def test_make_data_is_deterministic(tmp_path):
    """data/make_data.py regenerates the committed files byte for byte."""
    spec = importlib.util.spec_from_file_location("make_data", data_file("make_data.py"))
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    make_data.main(str(tmp_path))
    for name in ("sft_train.jsonl", "sft_heldout.jsonl", "prefs_train.jsonl", "prefs_heldout.jsonl", "pretrain.jsonl"):
        assert (tmp_path / name).read_bytes() == open(data_file(name), "rb").read(), name


def first_prompt(msgs):
    return json.dumps([m for m in msgs if m["role"] != "assistant"][:2])


def test_sample_data_held_out_prompts_are_unseen():
    train = {first_prompt(o["messages"][:2]) for _, o in data.read_jsonl(data_file("sft_train.jsonl"), "sft")}
    held = [first_prompt(o["messages"][:2]) for _, o in data.read_jsonl(data_file("sft_heldout.jsonl"), "sft")]
    assert not train & set(held)
    ptrain = {json.dumps(o["chosen"][:-1]) for _, o in data.read_jsonl(data_file("prefs_train.jsonl"), "prefs")}
    pheld = {json.dumps(o["chosen"][:-1]) for _, o in data.read_jsonl(data_file("prefs_heldout.jsonl"), "prefs")}
    assert not ptrain & pheld


def test_pretraining_pages_are_plain_text_without_the_held_out_questions():
    """data/pretrain.jsonl holds facts, as a base model's pre-training does: no chat
    markers, and no held-out question (SFT or preference) in any page."""
    pages = [o["text"] for o in map(json.loads, open(data_file("pretrain.jsonl"), encoding="utf-8"))]
    assert pages and not any("<|" in p or "</s>" in p for p in pages)
    questions = {m["content"] for _, o in data.read_jsonl(data_file("sft_heldout.jsonl"), "sft")
                 for m in o["messages"] if m["role"] == "user"}
    questions |= {o["chosen"][-2]["content"] for _, o in data.read_jsonl(data_file("prefs_heldout.jsonl"), "prefs")}
    assert not [q for q in questions if any(q in p for p in pages)]


@pytest.mark.parametrize("name", ["prefs_train.jsonl", "prefs_heldout.jsonl"])
def test_sample_prefs_share_the_prompt_and_differ_in_the_answer(name):
    for _, o in data.read_jsonl(data_file(name), "prefs"):
        c, r = o["chosen"], o["rejected"]
        assert c[:-1] == r[:-1] and c[-1]["role"] == r[-1]["role"] == "assistant"
        assert c[-1]["content"] != r[-1]["content"]


def test_load_sft_data_drops_conversations_with_nothing_to_learn(tmp_path, capsys):
    """As open-instruct: a conversation with no assistant token left after
    truncation (or none at all) is dropped, and the count is said."""
    tok = llama.Tokenizer(os.path.join(TINY, "tokenizer.model"))
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    cut = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    unanswered = [{"role": "user", "content": "hi"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (good, cut, unanswered)))
    assert tulu.load_sft_data(str(path), tok, 32).tolist() == [tulu.encode_messages(good, tok, 32)]
    assert f"{path}: 1 conversations (2 dropped: nothing left to learn)" in capsys.readouterr().out
    path.write_text(json.dumps({"messages": cut}) + "\n")
    with pytest.raises(TuluError, match="no conversation with an assistant turn"):
        tulu.load_sft_data(str(path), tok, 32)


def test_encode_messages_sample_data_fits_and_has_answers():
    """Every held-out conversation, in the tiny tokenizer, is short and has
    something to learn (the demo trains with max_seq_length well above this)."""
    tok = llama.Tokenizer(TINY)
    for n, o in data.read_jsonl(data_file("sft_heldout.jsonl"), "sft"):
        ids, labels = tulu.encode_messages(o["messages"], tok, 10**9)
        assert len(ids) <= 128 and learned(ids, labels), n


# -----------------------------------------------------------------------------
# The tiny tokenizer


def chats(path):
    return [tulu.chat_text(obj["messages"]) for _, obj in data.read_jsonl(path, "sft")]


def test_train_tiny_tokenizer_is_deterministic_and_llama_like(tmp_path):
    """Training on data/sft_train.jsonl gives the committed fixture byte for
    byte (the fixture itself was trained twice and compared), with Llama 2's
    special ids, and the chat markers come out in few tokens."""
    demo.train_tiny_tokenizer(str(tmp_path), chats(data_file("sft_train.jsonl")))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(TINY, name), "rb").read(), name
    tok = llama.Tokenizer(str(tmp_path))
    sp = tok.sp
    assert (sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tok.legacy is False and 512 <= tok.vocab_size <= 1024
    assert tok.encode("é") == [sp.piece_to_id("▁")] + [sp.piece_to_id(f"<0x{b:02X}>") for b in "é".encode()]
    assert tok.encode("12") == [sp.piece_to_id("▁"), sp.piece_to_id("1"), sp.piece_to_id("2")]  # split_digits
    for marker in ("<|system|>", "<|user|>", "<|assistant|>"):
        assert len(tok.encode(marker)) <= 3, marker
    nl = sp.piece_to_id("\n")
    assert tok.encode("a?\n<|user|>\nb").count(nl) == 2  # a newline never merges with its neighbours


def test_train_tiny_tokenizer_vocab_size_and_errors(tmp_path):
    demo.train_tiny_tokenizer(str(tmp_path), chats(data_file("sft_heldout.jsonl")), vocab_size=400)
    tok = llama.Tokenizer(str(tmp_path))
    assert tok.vocab_size == 400
    assert "</s>" not in tok.sp.id_to_piece(list(range(3, 400)))  # "</s>" is the EOS id, never text to learn
    with pytest.raises(TuluError, match="no such file"):
        demo.train_tiny_tokenizer(str(tmp_path), chats(str(tmp_path / "nope.jsonl")))
