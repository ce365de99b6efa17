"""What a run leaves behind, and the terminal's side of `chat`.

Outputs: lora and qlora runs write a PEFT adapter (lora.save_adapter), full runs an HF
model folder in the base checkpoint's dtype (float32 master weights rounded once, as
open-instruct and transformers' Trainer write them); under torchrun rank 0 alone writes,
gathering FSDP's shards a tensor at a time. Every output gets the tokenizer files it was trained
with (the adapter's own, where --adapter brought one), and a full model the base's
generation_config.json. Weights that are not finite are never written.

The chat template: tokenizer_config.json's "chat_template" (Jinja), which vLLM, TGI and
transformers' apply_chat_template format a conversation with, is made to give the ids of
the format the output was trained in (tulu.py's chat_template), replacing the base's.
apply_chat_template renders the text, BOS included, and tokenizes it adding nothing, so the
BOS written as text must leave the text after it encoded as training encoded it (template_bos).

Chat: the reply streams as the tokens come, decoded whole each time, so that a
character of several bytes shows once its last byte is there; generation stops at
every EOS id the model folder names (stop_ids).
"""
from __future__ import annotations

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


def template_bos(tok) -> str:
    """The BOS text a chat template starts with: what the tokenizer adds itself. Written as
    text, it leaves the text after it no longer at the start, which Llama 2's sentencepiece
    tokenizer with legacy=False encodes without the "▁" that training gave it ("<|user|>"
    unlike "▁<|user|>"): there a space follows the BOS, which becomes that "▁"."""
    names = {i: text for text, i in tok.specials.items()}
    bos = "".join(names[i] for i in tok.bos_ids)
    return bos + " " if bos and isinstance(tok, llama.SentencePieceTokenizer) and not tok.legacy else bos


def jinja_chat_template(tok, turns, generation, strip=False, system=None) -> str:
    """A Jinja chat_template for tokenizer `tok` (see JINJA_CHAT): turns {role: (header, end)},
    the generation prompt, the default system turn's content. A JSON object is a Jinja literal."""
    system = turns["system"][0] + system + turns["system"][1] if system is not None else ""
    chat = dict(bos=template_bos(tok), turns=turns, generation=generation, strip=strip, system=system)
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


def read_prompt():
    try:
        line = input("\n<|user|>\n")
    except EOFError:
        return None
    return None if line.strip() in ("/exit", "/quit") else line


def stream_reply(model, tok, prompt_ids, args, g, stop):
    """Generate the assistant's answer and print it as it comes; it ends at an id in `stop`."""
    new, shown = [], ""
    print("<|assistant|>")

    def on_token(i):
        nonlocal shown
        new.append(i)
        text = tok.decode([t for t in new if t not in stop])
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text

    llama.generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=stop, on_token=on_token, generator=g)
    final = tok.decode([t for t in new if t not in stop])
    print(final[len(shown):])  # a character cut off by --max-new-tokens shows as it stays in the history
    return final
