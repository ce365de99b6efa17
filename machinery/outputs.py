"""What a run leaves behind.

lora and qlora runs write a PEFT adapter, full runs an HF model folder in the base checkpoint's
dtype (float32 master weights rounded once, as open-instruct and transformers' Trainer write them);
under torchrun rank 0 alone writes, gathering FSDP's shards a tensor at a time. Weights that are
not finite are never written. Every output gets the tokenizer files it was trained with and, in
tokenizer_config.json, a "chat_template": the Jinja with which vLLM, TGI and apply_chat_template
format a conversation, made to give the ids of the format the output learned.
"""
import json
import os
import shutil

import llama
from llama import atomic_write, save_model
from machinery.checks import check_finite_weights, tokenizer_source
from machinery.distributed import rank0, whole

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def stop_ids(model_dir, tok) -> list[int]:
    """The tokenizer's EOS id and every EOS id the model folder names: config.json's
    and generation_config.json's eos_token_id, an id or a list of them (Llama 3.1
    Instruct stops at <|end_of_text|>, <|eom_id|> and <|eot_id|>)."""
    ids = [tok.eos_id]
    for path in (os.path.join(model_dir, name) for name in ("config.json", "generation_config.json")):
        value = llama.read_json(path, "a JSON object").get("eos_token_id") if os.path.exists(path) else None
        ids += value if isinstance(value, list) else [value]
    return sorted({i for i in ids if i is not None})


def copy_tokenizer(src, out, names=TOKENIZER_FILES):
    for name in names:
        if os.path.exists(os.path.join(src, name)) and os.path.abspath(src) != os.path.abspath(out):
            copy = lambda tmp, n=name: shutil.copyfile(os.path.join(src, n), tmp)
            atomic_write(os.path.join(out, name), copy)


# The chat template's Jinja, after `{%- set chat = {...} -%}` (jinja_chat_template): each message
# is turns[role][0] + its content stripped + turns[role][1]; `system` comes first where the
# conversation has no system turn; the text is stripped if `strip`, unless a generation prompt ends it.
JINJA_CHAT = (
    '{%- set ns = namespace(text=chat.system) -%}'
    '{%- if messages and messages[0].role == "system" -%}{%- set ns.text = "" -%}{%- endif -%}'
    '{%- for m in messages -%}{%- set turn = chat.turns[m.role] -%}'
    '{%- set ns.text = ns.text + turn[0] + m.content|trim + turn[1] -%}{%- endfor -%}'
    '{{- chat.bos -}}{%- if add_generation_prompt -%}{{- ns.text + chat.generation -}}'
    '{%- elif chat.strip -%}{{- ns.text|trim -}}{%- else -%}{{- ns.text -}}{%- endif -%}')


def jinja_chat_template(tok, turns, generation, strip=False, system=None) -> str:
    """A Jinja chat_template for tokenizer `tok` (JINJA_CHAT): turns {role: (header, end)}, the
    generation prompt, the default system turn's content (a JSON object is a Jinja literal). It
    starts with the BOS the tokenizer adds, as text: apply_chat_template renders the text and
    tokenizes it adding nothing. Llama 2's sentencepiece tokenizer with legacy=False encodes the
    text after a BOS written as text without the "▁" training gave it ("<|user|>", not
    "▁<|user|>"): there a space follows the BOS."""
    names = {i: text for text, i in tok.specials.items()}
    bos = "".join(names[i] for i in tok.bos_ids)
    bos += " " * bool(bos and isinstance(tok, llama.SentencePieceTokenizer) and not tok.legacy)
    system = turns["system"][0] + system + turns["system"][1] if system is not None else ""
    chat = dict(bos=bos, turns=turns, generation=generation, strip=strip, system=system)
    return "{%- set chat = " + json.dumps(chat, ensure_ascii=False) + " -%}" + JINJA_CHAT


def write_chat_template(out, template):
    """Set the chat_template of out/tokenizer_config.json (written if there is none)."""
    config = llama.tokenizer_config(out)
    llama.write_json(os.path.join(out, "tokenizer_config.json"), {**config, "chat_template": template})


def save_outputs(args, model, model_dir, out, template=None):
    """lora/qlora: a PEFT adapter; full: a Hugging Face model folder. Both get the tokenizer,
    with `template` as its chat template."""
    from lora import adapter_tensors, save_adapter
    full = args.method == "full"
    # on every rank: FSDP's shards are checked where they are, one verdict for all
    check_finite_weights(((n, p) for n, p in model.named_parameters() if p.requires_grad or full), "output")
    if not rank0():  # under FSDP rank 0 writes each tensor as it is gathered; the others help, in its order
        for t in (llama.model_tensors(model) if full else adapter_tensors(model)).values():
            whole(t)
        return
    if full:  # in the base checkpoint's dtype, as open-instruct and transformers' Trainer
        save_model(model, out, dtype=llama.checkpoint_dtype(model_dir), fetch=whole)
        copy_tokenizer(model_dir, out, ("generation_config.json",))
    else:
        save_adapter(model, out, base_model_name_or_path=model_dir, fetch=whole)
    copy_tokenizer(tokenizer_source(getattr(args, "adapter", None), model_dir), out)
    if template:
        write_chat_template(out, template)
    print(f"wrote {'model' if full else 'adapter'}, tokenizer and metrics.jsonl to {out}")
