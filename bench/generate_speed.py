"""Greedy generation speed of llama.generate against transformers' generate on
the same checkpoint, in the same run. A benchmark, not a test: run it in a venv
that has transformers.

    python bench/generate_speed.py [--new-tokens 64] [--prompt 32] [--repeats 3] [--device cpu|cuda]

Two random checkpoints written by transformers: "smollm2" has SmolLM2-135M's
shape (30 layers, GQA 9/3 heads, a 49,152-token vocabulary, tied embeddings),
"mid" an 8-layer model of Llama 2's proportions. Each run greedily continues
one prompt; the runs alternate (ours, theirs, ours, ...) so that the machine's
load falls on both alike, and the best of --repeats counts. Printed: tokens/s
of each and ours divided by theirs (> 1: we are faster), and whether the
tokens are identical.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    rope_theta=100000.0, tie_word_embeddings=True),
    "mid": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    from transformers import LlamaConfig, LlamaForCausalLM
    import llama
    print(f"device {args.device}, {dtype}, {torch.get_num_threads()} threads; prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, best of {args.repeats}")
    for name, shape in SHAPES.items():
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**shape, initializer_range=0.1)).save_pretrained(d)
            theirs = LlamaForCausalLM.from_pretrained(d, dtype=dtype).to(args.device).eval()
            ours = llama.load_model(d, dtype=dtype, device=args.device)
        prompt = torch.randint(0, shape["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1))
        p = prompt.to(args.device)

        def run_ours():
            return llama.generate(ours, p[0], args.new_tokens)

        def run_theirs():
            with torch.no_grad():
                out = theirs.generate(p, attention_mask=torch.ones_like(p), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      eos_token_id=None, pad_token_id=0)
            return out[0, args.prompt:].tolist()

        best = {"ours": float("inf"), "theirs": float("inf")}
        tokens = {}
        for _ in range(args.repeats):
            for tag, fn in (("ours", run_ours), ("theirs", run_theirs)):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                tokens[tag] = fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                best[tag] = min(best[tag], time.perf_counter() - t)
        a, b = args.new_tokens / best["ours"], args.new_tokens / best["theirs"]
        print(f"{name}: ours {a:.1f} tokens/s, transformers {b:.1f} tokens/s, ratio {a / b:.2f}; "
              f"identical tokens: {tokens['ours'] == tokens['theirs']}")


if __name__ == "__main__":
    main()
