"""The command line around the recipe: what tulu.py's commands share, and the commands that
only use the recipe (merge, chat, eval) with their flags. What they need of the recipe (the
chat format, the tasks) comes from tulu.py as parameters: this folder never imports it.
run() ends a command that meets bad input with one line and an exit status, never a traceback.
"""
import argparse
import functools
import itertools
import os
import sys

import torch
from tqdm import tqdm

import dpo
import llama
from llama import Tokenizer, TuluError, load_model, save_model
from machinery import checks, data, distributed as dist, evaluate, outputs


def count(s, least=0):
    """argparse's type for a count (positive_int: one of at least 1)."""
    if not s.lstrip("-").isdigit() or int(s) < least:
        raise argparse.ArgumentTypeError(f"{s!r} is not a {'positive' if least else 'non-negative'} integer")
    return int(s)


positive_int = functools.partial(count, least=1)


def cache_dir():
    """Where the demo's models and the encoded data are kept: $XDG_CACHE_HOME/tulu or ~/.cache/tulu."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tulu")


def device_and_dtype(device, dtype):
    """--device auto: cuda where there is one. --dtype auto: bf16 on a CUDA GPU that has it (as
    QLoRA and the Tulu 2 runs), fp32 elsewhere; a GPU without bf16 (V100, T4) computes in fp32."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise TuluError("--device cuda: no CUDA device is available")
    bf16 = device != "cuda" or torch.cuda.is_bf16_supported()
    no_bf16 = "this GPU has no bf16 arithmetic (torch.cuda.is_bf16_supported() is False)"
    if dtype == "bf16" and not bf16:
        raise TuluError(f"--dtype bf16: {no_bf16}; use --dtype fp32")
    if dtype == "auto" and not bf16:
        print(f"note: {no_bf16}: computing in fp32 (--dtype fp32)")
    dtype = ("bf16" if device == "cuda" and bf16 else "fp32") if dtype == "auto" else dtype
    return device, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def autocast(cfg):
    """bf16 autocast when --dtype is bf16 (QLoRA's bf16 compute), on the CPU too, so that a CPU run
    does a GPU run's arithmetic: matrix products in bf16, float32 master weights cast for each one."""
    enabled = cfg.dtype == torch.bfloat16
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=enabled)


def on(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def eval_batches(model, examples, task, cfg, desc, d=None):
    """(examples, device batch) in order, the model in eval mode (no dropout); under
    torchrun (d), this rank's share (deal, padded with the first batches)."""
    model.eval()
    chunks = [examples[i:i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
    for chunk in tqdm(dist.deal(chunks, d or dist.SINGLE), desc=desc, leave=False):
        yield chunk, on(task.collate(chunk), cfg.device)


def print_config(cfg, fields):
    """One line of the run's settings: the fields (of tulu.py's TrainConfig) that the command has."""
    has = lambda f: not isinstance(f.metadata.get("help"), dict) or cfg.command in f.metadata["help"]
    shown = {f.name: getattr(cfg, f.name) for f in fields if f.name != "dist" and has(f)}
    shown = {k: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v for k, v in shown.items()}
    print("config: " + " ".join(f"{k}={v}" for k, v in shown.items()))


def tokenizer(model_dir, adapter=None):
    """The tokenizer of a model (the adapter's, where it has one), checked against its embedding."""
    return checks.check_vocab(Tokenizer(checks.tokenizer_source(adapter, model_dir)), model_dir)


def tuned_model(path, adapter, dtype, device="cpu", qlora=False, merged=False):
    """load_model (qlora: the base quantised to NF4, as the adapter was trained), then the PEFT
    adapter on top; merged: folded into the weights, each W + delta in float32, rounded once."""
    from lora import load_adapter, merge_lora
    model = load_model(path, dtype=dtype, device=device, quantize="nf4" if qlora else None)
    if adapter:
        load_adapter(model, adapter)
        if merged:
            merge_lora(model, dtype=dtype)
    return model


def merge(args, chat_template):
    """`tulu.py merge`: the adapter folded into its base, written as an HF folder with the tokenizer
    and its chat template (the adapter's, else Tulu's). --qlora: the base quantised to NF4 and back,
    as the adapter was trained (open-instruct merge_lora.py --qlora), read in the output dtype."""
    checks.check_output(args.output, args.model)
    tok = checks.check_vocab(checks.folder_tokenizer(args.adapter, args.model), args.model)
    dtype = device_and_dtype("cpu", args.dtype)[1]
    save_model(tuned_model(args.model, args.adapter, dtype, qlora=args.qlora, merged=True), args.output)
    outputs.copy_tokenizer(args.model, args.output, ("generation_config.json",))
    src = checks.tokenizer_source(args.adapter, args.model)
    outputs.copy_tokenizer(src, args.output)
    if tok and not (src == args.adapter and "chat_template" in llama.tokenizer_config(src)):
        outputs.write_chat_template(args.output, chat_template(tok))  # an adapter's own template stays
    print(f"merged {args.adapter} into {args.model}: wrote {args.output}")


def read_prompt(header):
    try:
        line = input(f"\n{header}\n")
    except EOFError:
        return None
    return None if line.strip() in ("/exit", "/quit") else line


def stream_reply(model, tok, prompt_ids, args, g, stop, header):
    """The assistant's answer after its header, printed as it comes, decoded whole each time so that
    a character of several bytes shows once its last byte is there; it ends at an id in `stop`."""
    new, shown = [], ""
    print(header)

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


def chat(args, default_model, encode_prompt, headers):
    """`tulu.py chat`: the model (default_model() without --model) and adapter, merged in memory,
    answer each prompt after the conversation so far, in the chat format (encode_prompt; its role
    headers shown on screen): --prompt once, else line by line until EOF or /exit. Generation
    stops at every EOS id the model names."""
    device, dtype = device_and_dtype(args.device, args.dtype)
    model_dir = args.model or default_model()
    tok = tokenizer(model_dir, args.adapter)
    model = tuned_model(model_dir, args.adapter, dtype, device, merged=True)
    stop = outputs.stop_ids(model_dir, tok)
    history = [{"role": "system", "content": args.system}] if args.system else []
    g = torch.Generator(device=device).manual_seed(args.seed)
    ask = lambda: read_prompt(headers["user"].strip())
    for prompt in [args.prompt] if args.prompt is not None else iter(ask, None):
        history.append({"role": "user", "content": prompt})
        reply = stream_reply(model, tok, encode_prompt(history, tok, args.chat_format), args, g, stop,
                             headers["assistant"].strip())
        history.append({"role": "assistant", "content": reply})


def evaluate_model(args, cfg, tasks, chat_format, cache_reference, as_row=None):
    """`tulu.py eval`: by the keys of --data's first object (one read), held-out loss, DPO's rewards
    (the reference: --reference, else --model without --adapter) or multiple-choice accuracy, by
    tulu.py's tasks (tasks(eos_id), by kind), chat format and reference scoring; as_row: the QLoRA
    row scored in place of each conversation (--chat-format qlora)."""
    first, objects = itertools.tee(data.read_objects(cfg.data))
    kind = evaluate.data_kind(args, first)
    tok = tokenizer(cfg.model, cfg.adapter)
    task = tasks(tok.eos_id)[kind]
    load = lambda path, adapter=None: tuned_model(path, adapter, cfg.dtype, cfg.device, args.qlora)
    if kind == "choice":
        items = evaluate.read_choices(cfg.data, objects)
        dev = evaluate.read_choices(args.dev, data.read_objects(args.dev)) if args.dev else []
        shots = 5 if args.shots is None and dev else args.shots or 0
        model = load(cfg.model, cfg.adapter)
        score = lambda rows: evaluate.choice_scores(model, rows, task, cfg, eval_batches, autocast)
        metrics = evaluate.choice_metrics(items, dev, shots, tok, cfg, score)
        return evaluate.report(cfg, kind, len(items), metrics, shots)
    if kind == "sft" and as_row:
        examples = [chat_format.row(as_row(o) if "messages" in o else o, tok) for _, o in objects]
    else:
        examples = data.load_examples(cfg.data, kind, tok, cfg.max_seq_length, chat_format)
    if kind == "prefs" and args.reference:  # scored first, then freed: one model in memory at a time
        checks.check_vocab(tok, args.reference)
        examples = cache_reference(load(args.reference), examples, task, cfg)
    model = load(cfg.model, cfg.adapter)
    metrics = evaluate.held_out_metrics(model, examples, task, cfg, eval_batches, autocast)
    evaluate.report(cfg, kind, len(examples), metrics)


def run(args):
    """Run the parsed command: a TuluError or OSError (a missing file, a full disk...) ends it with
    one line and status 1; Ctrl-C outside the training loop (which checkpoints itself) with 130."""
    try:
        args.func(args)
    except (TuluError, OSError) as e:
        if not isinstance(e, dist.RankError) or dist.rank0():  # every rank has it: rank 0 says it
            print(f"tulu {args.command}: error: {dist.error_text(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\ntulu {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


# -----------------------------------------------------------------------------
# The flags of merge, chat and eval


def merge_flags(p):
    p.add_argument("--model", required=True, help="the base model folder")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    p.add_argument("--output", required=True)
    p.add_argument("--qlora", action="store_true", help="quantise the base to NF4 and back first, as the "
                   "adapter was trained (open-instruct merge_lora.py --qlora)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="output dtype (default "
                   "%(default)s); with --qlora also the dtype the base is quantized from, as in training: "
                   "bf16 on a GPU (open-instruct), fp32 for CPU runs")


def model_flags(p, model, adapter):  # what chat and eval share
    p.add_argument("--model", help=f"HF Llama folder (default: the tiny demo model after its SFT{model})")
    p.add_argument("--adapter", help=adapter)
    p.add_argument("--chat-format", choices=["tulu", "qlora"], default="tulu", help="tulu: the Tulu 2 format "
                   "(default); qlora: the QLoRA card's, for its Guanaco and OpenOrca adapters")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if any")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="default: bf16 on CUDA, "
                   "fp32 on CPU")


def chat_flags(p):
    model_flags(p, ", which the demo `tulu.py dpo` starts from; built once and cached",
                "PEFT adapter to apply (merged in memory)")
    p.add_argument("--prompt", help="answer this once and exit (default: interactive)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="nucleus sampling")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default %(default)s)")


def eval_flags(p):
    model_flags(p, "", "PEFT adapter to evaluate on --model; for preference pairs the model without it is "
                "the reference")
    p.add_argument("--qlora", action="store_true", help="quantise the base to NF4 first, as a qlora adapter "
                   "was trained (default: the base as stored)")
    p.add_argument("--data", required=True, help="JSONL of conversations ({\"messages\"}, or QLoRA's rows: "
                   "loss, perplexity), preference pairs ({\"chosen\", \"rejected\"}: DPO's rewards/*) or "
                   "multiple choice ({\"question\", \"choices\", \"answer\", \"subject\"}: accuracy)")
    p.add_argument("--reference", help="reference model folder for preference pairs (default with --adapter: "
                   "--model without the adapter)")
    p.add_argument("--dev", help="multiple choice: JSONL of solved examples, taken in file order by subject")
    p.add_argument("--shots", type=count, help="multiple choice: solved examples before each question "
                   "(default 5 with --dev, MMLU 5-shot as in QLoRA; 0 without)")
    p.add_argument("--max-seq-length", type=positive_int, default=2048, help="truncate conversations and "
                   "pairs; multiple-choice prompts drop solved examples until they fit, as MMLU's "
                   "evaluate.py (default %(default)s, MMLU's)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass (default "
                   "%(default)s)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta of the rewards (default 0.1, Tulu 2)")
    p.add_argument("--loss", default="sigmoid", choices=list(dpo.LOSS_TYPES),
                   help="DPO loss for the loss metric (default %(default)s)")
    p.add_argument("--output", help="also write the results to this JSON file")
