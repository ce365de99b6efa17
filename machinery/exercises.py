"""Exercise mode: `python tulu.py exercises OUT_DIR` writes a student copy of tulu in which
key function bodies are left to write, each graded by the tests whose names contain the
exercise's name. In the chapters a teachable body sits between `# exercise: <name>` and
`# end exercise`, two comment lines at its indentation; the copy has `raise
NotImplementedError("exercise <name>: see EXERCISES.md")` in its place, and the docstring
above it is the contract.
"""
import ast
import inspect
import os
import pathlib
import re
import shutil
import textwrap

from llama import TuluError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXERCISES = {  # name -> (file, function, what to read first[, pytest selector]), in reading order
    "rms_norm": ("llama.py", "rms_norm", "RMSNorm (arXiv 1910.07467) Sec. 3, Eq. 4; llama.py: class RMSNorm"),
    "apply_rope": ("llama.py", "apply_rope",
        "RoFormer (arXiv 2104.09864) Sec. 3.2 and 3.4.2, Eq. 34; llama.py: rope_inv_freq, rope_cos_sin"),
    "gqa_attention": ("llama.py", "gqa_attention",
        "GQA (arXiv 2305.13245) Sec. 2.2; llama.py: attention_mask_4d, Attention.forward"),
    "bpe_merge": ("llama.py", "bpe_merge", "BPE (arXiv 1508.07909) Sec. 3.2; GPT-2's byte-level BPE (Radford "
        "et al. 2019, Sec. 2.2); llama.py: byte_alphabet, BPETokenizer.encode_word",
        "tests/test_tokenizer.py -k bpe_merge"),
    "nf4_code_book": ("nf4.py", "nf4_code_book",
        "QLoRA (arXiv 2305.14314) Sec. 3, 4-bit NormalFloat (Eq. 4); nf4.py: the module docstring"),
    "quantize_blockwise": ("nf4.py", "quantize_blockwise",
        "QLoRA Sec. 2, block-wise k-bit quantization (Eq. 1); nf4.py: nearest_code",
        "tests/test_nf4.py -k test_quantize_blockwise"),  # not dequantize_blockwise's tests
    "dequantize_blockwise": ("nf4.py", "dequantize_blockwise",
        "QLoRA Sec. 2 (Eq. 2); nf4.py: quantize_blockwise"),
    "double_quant": ("nf4.py", "double_quantize",
        "QLoRA Sec. 3, Double Quantization (Eq. 6); nf4.py: dynamic_map, quantize_nf4, dequantize_nf4"),
    "lora_forward": ("lora.py", "LoRALinear.forward",
        "LoRA (arXiv 2106.09685) Sec. 4.1, Eq. 3; lora.py: LoRALinear.__init__"),
    "merge": ("lora.py", "lora_delta",
        "LoRA Sec. 4.1 (no additional inference latency); lora.py: merged_linear, merge_lora"),
    "sequence_logps": ("dpo.py", "sequence_logps", "DPO (arXiv 2305.18290) Sec. 4, Eq. 7: pi(y|x) is the "
        "whole answer's probability; dpo.py: answer_logps; llama.py: pad_batch"),
    "dpo_loss": ("dpo.py", "dpo_loss",
        "DPO Sec. 4, Eq. 7 and its gradient; IPO (arXiv 2310.12036) Eq. 17; dpo.py: sequence_logps"),
    "encode_messages": ("tulu.py", "encode_messages",
        "Tulu 2 (arXiv 2311.10702) trains on the Tulu chat format; tulu.py: ROLE_HEADERS, chat_text"),
}
# graded by the tests of its file whose names contain the exercise's name, unless said otherwise
EXERCISES = {name: (*e, f"tests/test_{e[0][:-3]}.py -k {name}")[:4] for name, e in EXERCISES.items()}
EXERCISE_FILES = tuple(dict.fromkeys(file for file, *_ in EXERCISES.values()))  # in reading order
STUDENT_COPY = EXERCISE_FILES + ("conftest.py", "pytest.ini", "requirements.txt", "README.md", "data",
                                 "machinery", "tests")
# test_exercises.py tests this generator, not the student's work
NOT_COPIED = ("__pycache__", "*.pyc", ".pytest_cache", "*.tmp[0-9]*", "test_exercises.py")
# an exercise's block: its marker, the lines after it, the first `# end exercise` at the marker's indentation
BLOCK = re.compile(r"^( *)# exercise: (\w+)\n(?:.*\n)*?\1# end exercise\n", re.M)
MARKER = re.compile(r"^ *# (end )?exercise\b", re.M)  # a line meant as a marker, well spelt or not


def find_function(tree: ast.Module, qualname: str):
    """The def of `name` or `Class.name` at the top of a module, or None."""
    for part in qualname.split("."):
        tree = next((n for n in getattr(tree, "body", []) if getattr(n, "name", None) == part), None)
    return tree


def exercise_blocks(src_root: str) -> dict[str, dict[str, re.Match]]:
    """{file: {name: its block}}, each block from `# exercise: name` to the first `# end exercise`
    at its indentation, checked against EXERCISES: each exercise marked once, inside its function,
    in its file. A marker outside a pair (misspelt, nested, left open, closed twice): TuluError."""
    found = {}
    for file in EXERCISE_FILES:
        path, blocks = os.path.join(src_root, file), found.setdefault(file, {})
        text = pathlib.Path(path).read_text()
        line = lambda at: text.count("\n", 0, at) + 1
        for block in BLOCK.finditer(text):
            if block[2] in blocks:
                raise TuluError(f"{path}:{line(block.start())}: a second exercise {block[2]!r}")
            blocks[block[2]] = block
        paired = {line(b.start()) for b in blocks.values()} | {line(b.end() - 1) for b in blocks.values()}
        unpaired = sorted({line(m.start()) for m in MARKER.finditer(text)} - paired)
        if unpaired:
            raise TuluError(f"{path}:{unpaired[0]}: an exercise marker outside a pair ('# exercise: NAME' "
                            "above '# end exercise' at the same indentation)")
        missing = [name for name, e in EXERCISES.items() if e[0] == file and name not in blocks]
        if missing:
            raise TuluError(f"{path}: no '# exercise: {missing[0]}' marker (machinery/exercises.py puts it "
                            f"in {EXERCISES[missing[0]][1]})")
        tree = ast.parse(text)
        for name, block in blocks.items():
            begin = line(block.start())
            if EXERCISES.get(name, ("",))[0] != file:
                raise TuluError(f"{path}:{begin}: exercise {name!r} is not in machinery/exercises.py's "
                                "EXERCISES")
            fn = find_function(tree, EXERCISES[name][1])
            if fn is None or not fn.lineno < begin <= fn.end_lineno:  # its indentation keeps it there
                raise TuluError(f"{path}:{begin}: exercise {name!r} is not inside {EXERCISES[name][1]}")
    return found


def exercises_md(src_root: str) -> str:
    """EXERCISES.md: how to work, then each exercise: its contract, what to read, the command."""
    rows, parts = [], []
    for k, (name, (file, function, read, selector)) in enumerate(EXERCISES.items(), start=1):
        source = pathlib.Path(src_root, file).read_text()
        # the docstring as written (in triple quotes), so that an escape such as "\n" stays two characters
        doc = ast.get_source_segment(source, find_function(ast.parse(source), function).body[0])[3:-3]
        grading = f"python -m pytest {selector}"
        rows.append(f"| {k} | `{name}` | {file}: `{function}` | `{grading}` |")
        parts.append(f"## {k}. {name}\n\nImplement `{function}` in {file}; its docstring is the contract:\n\n"
                     f"{textwrap.indent(inspect.cleandoc(doc), '    ')}\n\n"
                     f"Read first: {read}.\n\nGraded by: `{grading}`\n")
    return "\n".join([
        "# Exercises", "",
        f"This is a student copy of tulu: the bodies of {len(EXERCISES)} key functions are replaced by",
        '`raise NotImplementedError("exercise <name>: see EXERCISES.md")`. Write each body in place of its',
        "`raise`, the docstring above it the contract (formula, shapes, the details the reference libraries'",
        "numbers depend on), and run its grading command until it passes. Work in order: an exercise's tests",
        "may use the exercises before it, never one after it. `python -m pytest` fails exactly the grading",
        "tests of unfinished exercises and skips the other tests that reach one (\"waits on exercise NAME\",",
        "see conftest.py).", "",
        "| # | exercise | where | graded by |", "| --- | --- | --- | --- |", *rows, "", *parts])


def make_exercises(src_root: str, out_dir: str):
    """Copy the project at src_root (its files, data/, machinery/ and tests/, no caches) to out_dir,
    each exercise's block replaced by one `raise` line at its indentation (the function still parses
    and fails only when called), and EXERCISES.md. The markers are checked before anything is written."""
    src, out = os.path.realpath(src_root), os.path.realpath(out_dir)
    if out == src or any((out + os.sep).startswith(os.path.join(src, d, "")) for d in STUDENT_COPY):
        raise TuluError(f"{out_dir}: is the project, or inside a folder of it that the copy takes; "
                        "choose another")
    found = exercise_blocks(src_root)
    os.makedirs(out_dir, exist_ok=True)
    for name in STUDENT_COPY:
        src, dst = os.path.join(src_root, name), os.path.join(out_dir, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*NOT_COPIED), dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    blank = lambda b: f'{b[1]}raise NotImplementedError("exercise {b[2]}: see EXERCISES.md")\n'
    for file in found:
        pathlib.Path(out_dir, file).write_text(BLOCK.sub(blank, pathlib.Path(src_root, file).read_text()))
    pathlib.Path(out_dir, "EXERCISES.md").write_text(exercises_md(src_root))


def command(args):
    """`tulu.py exercises OUT_DIR`: the student copy of this project, and where to start."""
    out = args.out_dir
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not args.force:
        raise TuluError(f"{out}: is not empty (--force writes the student copy over it)")
    make_exercises(ROOT, out)
    name, (file, function, _, selector) = next(iter(EXERCISES.items()))
    print(f"wrote a student copy of tulu with {len(EXERCISES)} exercises to {out}; read {out}/EXERCISES.md "
          f"and start with {name} ({file}: {function}):\n  cd {out} && python -m pytest {selector}")


def flags(p):
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the copy: new or empty, unless --force")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
