"""Tests for tulu.py's two formats against their references: the chat template every
output folder ships, and QLoRA's rows and prompt.

Golden files come from tests/make_fixtures.py (area "formats"):
- templates.json: transformers 5's apply_chat_template over our template for each
  format, written into the tokenizer files of tests/fixtures/cli/hf_tiny (Llama 2 style
  sentencepiece, legacy=False) and of tests/fixtures/bpe/hf_tiny_llama3 (a Llama 3
  style tokenizer.json), for every conversation of the chat area, with and without
  add_generation_prompt;
- transformers4.json: artidoro/qlora's DataCollatorForCausalLM over the slow
  sentencepiece tokenizer QLoRA loads (use_fast=False) in both legacy modes and over
  the tokenizer.json, on rows of both kinds, cut and uncut; the QLoRA card's prompts as
  its usage tokenizes them; and the slow tokenizer's apply_chat_template (transformers
  5 converts sentencepiece to a tokenizer that encodes otherwise with legacy=True).

Here the ids are compared with tulu's encoders, and our template, rendered as
transformers renders it (jinja2, which torch depends on, in its sandbox with
transformers' settings), is tokenized as apply_chat_template tokenizes (nothing
added) and compared with the same ids.
"""
import json
import os

import pytest
import torch

import llama
import lora
import tulu
from machinery import data

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures", "formats")
HF_TINY = os.path.join(HERE, "fixtures", "cli", "hf_tiny")
BPE_TINY = os.path.join(HERE, "fixtures", "bpe", "hf_tiny_llama3")
BASES = {"sentencepiece_legacy_false": (HF_TINY, False), "sentencepiece_legacy_true": (HF_TINY, True),
         "tokenizer_json": (BPE_TINY, None)}
SMALL = ["--max-seq-length", "128", "--lora-r", "8", "--batch-size", "4", "--grad-accum", "1", "--seed", "0"]


def load(name):
    with open(os.path.join(FIX, name)) as f:
        return json.load(f)


def tokenizer(base):
    path, legacy = BASES[base]
    return llama.Tokenizer(path, legacy)


def render(template, messages, add_generation_prompt):
    """The text apply_chat_template tokenizes: transformers' Jinja environment and arguments."""
    sandbox = pytest.importorskip("jinja2.sandbox")
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def ours(messages, tok, chat_format, add_generation_prompt):
    """What tulu trains on (a whole conversation) or prompts with (add_generation_prompt)."""
    if add_generation_prompt:
        return tulu.encode_prompt(messages, tok, chat_format)
    if chat_format == "qlora":
        return tok.encode(tulu.qlora_text(messages), bos=True)
    return tulu.encode_messages(messages, tok, 10**9)[0]


def template_cases():
    fast, slow = load("templates.json"), load("transformers4.json")
    for base, formats in fast["bases"].items():
        yield f"transformers{fast['transformers']}-{base}", base, formats, fast["conversations"]
    for base, found in slow["bases"].items():
        if "templates_slow" in found:
            yield f"transformers{slow['transformers']}-slow-{base}", base, found["templates_slow"], \
                fast["conversations"]


# -----------------------------------------------------------------------------
# The chat template: apply_chat_template gives what tulu trains on and prompts with


@pytest.mark.parametrize("chat_format", ["tulu", "qlora"])
@pytest.mark.parametrize("case", list(template_cases()), ids=lambda c: c[0])
def test_chat_template_gives_the_encoding_of_training(case, chat_format):
    _, base, formats, conversations = case
    tok = tokenizer(base)
    template = tulu.chat_template(tok, chat_format)
    for c in formats[chat_format]:
        messages, gen = conversations[c["name"]], c["add_generation_prompt"]
        assert ours(messages, tok, chat_format, gen) == c["ids"], (c["name"], gen)
        assert tok.encode(render(template, messages, gen)) == c["ids"], (c["name"], gen)


def test_chat_template_writes_the_bos_that_keeps_the_first_piece():
    """Llama 2's sentencepiece with legacy=False encodes "<s><|user|>" without the "▁" that
    training puts before "<|user|>"; the template writes "<s> <|user|>" for it. Other tokenizers
    get the BOS as it is (legacy=True) or their own (<|begin_of_text|>)."""
    messages = [{"role": "user", "content": "Hi"}]
    for base, bos in [("sentencepiece_legacy_false", "<s> <|user|>"), ("sentencepiece_legacy_true", "<s><|user|>"),
                      ("tokenizer_json", "<|begin_of_text|><|user|>")]:
        tok = tokenizer(base)
        assert render(tulu.chat_template(tok), messages, True).startswith(bos), base
    tok = tokenizer("sentencepiece_legacy_false")
    text = render(tulu.chat_template(tok), messages, True)
    assert tok.encode(text.replace("<s> ", "<s>")) != tulu.encode_prompt(messages, tok)  # why the space


# -----------------------------------------------------------------------------
# QLoRA's rows and prompt


@pytest.mark.parametrize("base", list(BASES))
def test_encode_instruction_is_qloras_collator(base):
    ref = load("transformers4.json")
    tok, cases = tokenizer(base), iter(ref["bases"][base]["collator"])
    for lengths in ref["lengths"]:
        for row in ref["rows"]:
            c = next(cases)
            assert c["lengths"] == lengths
            assert tulu.encode_instruction(row, tok, *lengths) == (c["input_ids"], c["labels"]), (row, lengths)


@pytest.mark.parametrize("base", list(BASES))
def test_encode_prompt_qlora_is_the_cards_prompt(base):
    ref = load("transformers4.json")
    tok = tokenizer(base)
    for prompt, ids in zip(ref["card_prompts"], ref["bases"][base]["card_prompts"]):
        assert tulu.encode_prompt([{"role": "user", "content": prompt}], tok, "qlora") == ids


def test_qlora_text_writes_turns_as_the_oasst1_guanaco_text():
    """Several turns: "### Human: ...### Assistant: ..." (timdettmers/openassistant-guanaco),
    after the card's system line, or the conversation's own system turn."""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! "},
             {"role": "user", "content": "Bye"}]
    assert tulu.qlora_text(turns) == tulu.QLORA_SYSTEM + "\n### Human: Hi### Assistant: Hello!### Human: Bye"
    system = [{"role": "system", "content": "Be brief."}, *turns[:1]]
    assert tulu.qlora_text(system) == "Be brief.\n### Human: Hi"


def test_qlora_rows_are_read_by_their_keys(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"input": "a", "output": "b"}, {"text": "c"}, {"messages": [{"role": "user", "content": "d"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [obj for _, obj in data.read_jsonl(str(path), "sft")] == rows
    path.write_text(json.dumps({"input": 1, "output": "b"}) + "\n")
    with pytest.raises(llama.TuluError, match=r"rows.jsonl:1: 'input' and 'output' must be strings"):
        list(data.read_jsonl(str(path), "sft"))


# -----------------------------------------------------------------------------
# As a user: sft on QLoRA rows with a constant lr, then chat in the QLoRA format;
# merge a Tulu-format fine-tune of a tokenizer.json base whose template was ChatML


def test_sft_on_qlora_rows_then_chat_in_the_qlora_format(tmp_path, capsys, monkeypatch):
    ref = load("transformers4.json")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ref["rows"] * 2))
    out, loaded, load_sft_data = tmp_path / "adapter", [], tulu.load_sft_data
    monkeypatch.setattr(tulu, "load_sft_data",
                        lambda *a, **kw: loaded.append(load_sft_data(*a, **kw)) or loaded[-1])
    tulu.main(["sft", "--model", HF_TINY, "--data", str(rows), "--output", str(out), "--max-steps", "3",
               "--lr", "1e-3", "--lr-scheduler", "constant", "--warmup-ratio", "0.5", "--source-max-len", "12",
               "--target-max-len", "8", "--train-on-source", *SMALL])
    tok = llama.Tokenizer(str(out))
    assert loaded[0].tolist() == [tulu.encode_instruction(r, tok, 12, 8, True) for r in ref["rows"] * 2]
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["lr"] for line in f] == [1e-3] * 3  # transformers' constant: no warmup
    with open(out / "tokenizer_config.json") as f:
        template = json.load(f)["chat_template"]
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tulu.encode_prompt(prompt, tok, "qlora")
    assert tok.encode(render(template, prompt, True)) == ids  # the QLoRA template, not Tulu's

    model = llama.load_model(HF_TINY, dtype=torch.float32)
    lora.load_adapter(model, str(out))
    lora.merge_lora(model)
    answer = tok.decode([i for i in llama.generate(model, ids, 8, eos_id=tok.eos_id) if i != tok.eos_id])
    assert answer.strip()
    capsys.readouterr()
    tulu.main(["chat", "--model", HF_TINY, "--adapter", str(out), "--chat-format", "qlora", "--prompt",
               prompt[0]["content"], "--max-new-tokens", "8", "--dtype", "fp32"])
    assert capsys.readouterr().out == f"### Assistant:\n{answer}\n"  # the card's headers on screen too


def test_merge_writes_the_tulu_template_over_the_bases(tmp_path):
    """The base's tokenizer_config.json names ChatML; a Tulu-format fine-tune merged into it
    carries the Tulu template, from the adapter folder or, for an adapter that ships no
    tokenizer (as PEFT's own), written by merge."""
    base = tmp_path / "base"
    os.makedirs(base)
    for name in os.listdir(BPE_TINY):
        (base / name).write_bytes(open(os.path.join(BPE_TINY, name), "rb").read())
    config = llama.tokenizer_config(str(base))
    llama.write_json(str(base / "tokenizer_config.json"), {**config, "chat_template": "{{ 'ChatML' }}"})
    sft_data, adapter = tmp_path / "sft.jsonl", tmp_path / "adapter"
    with open(os.path.join(tulu.DATA, "sft_train.jsonl")) as f:
        sft_data.write_text("".join(next(f) for _ in range(8)))
    tulu.main(["sft", "--model", str(base), "--data", str(sft_data), "--method", "lora", "--output", str(adapter),
               "--max-steps", "1", *SMALL])
    bare = tmp_path / "bare_adapter"
    os.makedirs(bare)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((adapter / name).read_bytes())
    ref = load("templates.json")
    for a in (adapter, bare):
        merged = tmp_path / f"merged_{a.name}"
        tulu.main(["merge", "--model", str(base), "--adapter", str(a), "--output", str(merged)])
        with open(merged / "tokenizer_config.json") as f:
            template = json.load(f)["chat_template"]
        tok = llama.Tokenizer(str(merged))
        for c in ref["bases"]["tokenizer_json"]["tulu"]:
            messages = ref["conversations"][c["name"]]
            assert tok.encode(render(template, messages, c["add_generation_prompt"])) == c["ids"], (a, c["name"])


def test_eval_reads_qlora_rows_and_scores_conversations_in_the_qlora_format(tmp_path):
    """eval tells QLoRA's rows by their keys and scores them as sft trains them; --chat-format
    qlora scores a conversation as QLoRA scores oasst1's: its QLoRA text as one {"text"} row."""
    chats = [[{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    conversations, rows = tmp_path / "chats.jsonl", tmp_path / "rows.jsonl"
    conversations.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    rows.write_text("".join(json.dumps({"text": tulu.qlora_text(c)}) + "\n" for c in chats))
    results = []
    for data_file, chat_format in ((rows, "tulu"), (conversations, "qlora"), (conversations, "tulu")):
        out = tmp_path / f"{data_file.stem}_{chat_format}.json"
        tulu.main(["eval", "--model", HF_TINY, "--data", str(data_file), "--chat-format", chat_format,
                   "--dtype", "fp32", "--output", str(out)])
        results.append(json.loads(out.read_text())["loss"])
    assert results[0] == pytest.approx(results[1], abs=1e-6)
    assert results[1] != pytest.approx(results[2], abs=1e-3)  # the Tulu format is another text
