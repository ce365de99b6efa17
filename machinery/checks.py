"""Failing early, before the first step or before a file is written, on mistakes that would
otherwise surface hours into a run: as a traceback from F.embedding ("index out of range")
or as NaN weights written over good ones. Each ends the run with a one-line TuluError that
names the file and says what to do; examples longer than the model's context only warn.
"""
import contextlib
import math
import os
import sys

import torch

import llama
from llama import Tokenizer, TuluError
from machinery.data import example_lengths
from machinery.distributed import whole


def check_vocab(tok, model_dir):
    """Every id the tokenizer can produce needs a row of the embedding (more rows are fine)."""
    config = os.path.join(model_dir, "config.json")
    if tok is not None and tok.vocab_size > (rows := llama.LlamaConfig.from_json(config).vocab_size):
        raise TuluError(f"{tok.file}: the tokenizer has {tok.vocab_size} ids "
                        f"but the model's embedding has {rows} rows (vocab_size in {config}); a tokenizer of "
                        f"another model, or tokens added without resizing the embedding?")
    return tok


def tokenizer_source(adapter, model_dir):
    """The adapter's folder where it has a tokenizer (sft and dpo write one), else the model's."""
    files = ("tokenizer.model", "tokenizer.json")
    return adapter if adapter and any(os.path.exists(os.path.join(adapter, n)) for n in files) else model_dir


def folder_tokenizer(adapter, model_dir):
    """The tokenizer a merge copies, or None where tulu cannot read it: merge only copies it."""
    with contextlib.suppress(TuluError):
        return Tokenizer(tokenizer_source(adapter, model_dir))


def check_output(output, model, adapter=None):
    for flag, src in (("--model", model), ("--adapter", adapter)):
        if src and os.path.realpath(output) == os.path.realpath(src):
            raise TuluError(f"--output {output} is the {flag} folder: writing there would overwrite what "
                            f"this run reads; choose another --output")


def check_batch_size(args, examples, what):
    if args.batch_size > (n := len(examples)):
        raise TuluError(f"--batch-size {args.batch_size} is larger than the data set ({n} {what}"
                        f"{'s' * (n != 1)} in {args.data}): use --batch-size {n} or fewer, or more data")


def warn_beyond_context(args, examples):
    """RoPE runs past max_position_embeddings, but quality usually drops: warn, not stop."""
    config = os.path.join(args.model, "config.json")
    ctx, longest = llama.LlamaConfig.from_json(config).max_position_embeddings, max(example_lengths(examples))
    if longest > ctx:
        print(f"tulu {args.command}: warning: examples of up to {longest} tokens (--max-seq-length "
              f"{args.max_seq_length}) are longer than the model's context (max_position_embeddings {ctx} "
              f"in {config}); positions beyond it were never trained", file=sys.stderr)


def json_safe(row):
    """NaN and ±inf are not JSON (jq, JavaScript, dashboards reject json.dumps' bare NaN):
    write null, and name what was non-finite under "nonfinite"."""
    bad = {k: str(v) for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
    return {**{k: None if k in bad else v for k, v in row.items()}, **({"nonfinite": bad} if bad else {})}


def check_finite_weights(named, what):
    """Never write non-finite weights (a step can overflow a weight with a finite loss)."""
    # under FSDP each rank checks its shards, the verdicts all-reduced (whole): all raise or none
    if bad := next((n for n, p in named if not whole(torch.isfinite(p).all())), None):
        raise TuluError(f"{bad} holds non-finite values: {what} not written; "
                        f"try a lower --lr or --max-grad-norm")
