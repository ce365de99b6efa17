"""What a run leaves behind, and the terminal's side of `chat`.

Outputs: lora and qlora runs write a PEFT adapter (lora.save_adapter), full runs an HF
model folder in the base checkpoint's dtype (float32 master weights rounded once, as
open-instruct and transformers' Trainer write them); under torchrun rank 0 alone writes,
gathering FSDP's shards a tensor at a time. Every output gets the tokenizer files it was trained
with (the adapter's own, where --adapter brought one), and a full model the base's
generation_config.json. Weights that are not finite are never written.

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


def save_outputs(args, model, model_dir, out):
    """lora/qlora: a PEFT adapter; full: a Hugging Face model folder. Both get the tokenizer."""
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
    print(f"wrote {'model' if full else 'adapter'}, tokenizer and metrics.jsonl to {out}")


def read_prompt():
    try:
        line = input("\n<|user|>\n")
    except EOFError:
        return None
    return None if line.strip() in ("/exit", "/quit") else line


def stream_reply(model, tok, prompt_ids, args, g):
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

    llama.generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=args.stop_ids, on_token=on_token, generator=g)
    final = tok.decode([t for t in new if t not in args.stop_ids])
    print(final[len(shown):])  # a character cut off by --max-new-tokens shows as it stays in the history
    return final
