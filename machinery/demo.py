"""The demo builder: the models `python tulu.py sft` and `dpo` start from without --model, so
that the whole recipe runs on a laptop CPU in minutes. tiny_default_model makes the base model a
real run downloads: a sentencepiece tokenizer trained on data/sft_train.jsonl's chat text, and a
4-layer Llama "pretrained" for about a minute and a half on plain text (the conversations without
chat markers, and data/pretrain.jsonl's reference pages), so that SFT only teaches it to chat.
It is cached under $XDG_CACHE_HOME/tulu (or ~/.cache/tulu), named by a hash of its sources;
tulu.py's parts (chat_text, the loop, the SFT task, the config) come as parameters.
"""
import hashlib
import io
import os
import pathlib
import shutil

import torch

import llama
from llama import Tokenizer, save_model, write_json
from machinery.data import read_jsonl
from machinery.evaluate import exact_match

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEMO_HELDOUT = os.path.join(DATA, "sft_heldout.jsonl")

TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)
PRETRAIN = dict(command="pretrain", method="full", lr=2e-3, max_steps=2000, epochs=0, batch_size=16,
                grad_accum=1, warmup_ratio=0.03, max_grad_norm=1.0, weight_decay=0.0,
                adam_betas=(0.9, 0.999), adam_eps=1e-8, seed=0, resume=None, save_every=0, save_minutes=0,
                device="cpu", dtype=torch.float32)
PAGE_COPIES = 3  # data/pretrain.jsonl's reference pages are read this many times as often as a conversation


def train_tiny_tokenizer(out_dir: str, chats, vocab_size: int = 768):
    """A BPE sentencepiece model trained on the chat texts `chats` (markers included, so "<|user|>"
    costs few tokens; cut at each "</s>", an id, not text), in a folder transformers loads as a
    LlamaTokenizer. Settings as Llama 2's trainer_spec; "\n" a token of its own, so none spans the
    end of a turn; one thread, input in order: the same texts give the same bytes."""
    import sentencepiece as spm
    sentences = [s for text in chats for s in text.strip().split("</s>") if s]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>",
        bos_piece="<s>", eos_piece="</s>", user_defined_symbols=["\n"], num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    os.makedirs(out_dir, exist_ok=True)
    pathlib.Path(out_dir, "tokenizer.model").write_bytes(model.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "LlamaTokenizer", **special, "pad_token": None, "add_bos_token": True,
        "add_eos_token": False, "legacy": False, "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {}})


def tiny_default_model(folder, chat_text, train, task, config) -> str:
    """The path of the demo's base model (an HF folder) in `folder`, built there once, the same
    on a given machine."""
    source, pages = os.path.join(DATA, "sft_train.jsonl"), os.path.join(DATA, "pretrain.jsonl")
    sources = pathlib.Path(source).read_bytes() + pathlib.Path(pages).read_bytes()
    h = hashlib.sha256(sources + repr((TINY, PRETRAIN, PAGE_COPIES)).encode()).hexdigest()
    path = os.path.join(folder, f"tiny-llama-{h[:10]}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    print(f"building the tiny default model in {path} (once, about a minute and a half)")
    tmp = f"{path}.tmp{os.getpid()}"
    conversations = [obj["messages"] for _, obj in read_jsonl(source, "sft")]
    train_tiny_tokenizer(tmp, [chat_text(messages) for messages in conversations])
    tok = Tokenizer(tmp)
    torch.manual_seed(0)  # initialised as Hugging Face does: N(0, 0.02) matrices, unit norms
    model = llama.Llama(llama.LlamaConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                          eos_token_id=tok.eos_id, **TINY))
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, 0.0, 0.02)
    texts = ["\n".join(m["content"] for m in messages) for messages in conversations]
    texts += [obj["text"] for _, obj in read_jsonl(pages)] * PAGE_COPIES
    docs = [[tok.bos_id] + tok.encode(text) + [tok.eos_id] for text in texts]
    train(config(**PRETRAIN), model, [(d, d) for d in docs], task(tok.eos_id), tmp)
    save_model(model, tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def print_answers(path, prompts, answers: dict, shown=4):
    """A few prompts, the reference and each model's answer (name -> list), then exact-match rates."""
    w = max(len("reference"), *map(len, answers))
    one_line = lambda text: text.replace("\n", " / ")
    for i, (msgs, reference) in enumerate(prompts[:shown]):
        print(f"\n> {one_line(msgs[-1]['content'])}\n  {'reference':<{w}}  {one_line(reference)}")
        for name, a in answers.items():
            print(f"  {name:<{w}}  {one_line(a[i])}")
    rates = ", ".join(f"{name} {exact_match(a, [r for _, r in prompts]):.2f}" for name, a in answers.items())
    print(f"\nexact match, greedy, on the first {len(prompts)} conversations of {path}: {rates}")
