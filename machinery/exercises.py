"""Exercise mode: `python tulu.py exercises OUT_DIR` (make_exercises) writes a student
copy of tulu in which key function bodies are left to write, each graded by the tests
whose names contain the exercise's name. In the five chapter files, a teachable body
sits between two comment lines at its indentation,

    # exercise: <name>
    ...body...
    # end exercise

and the student copy has `raise NotImplementedError("exercise <name>: see EXERCISES.md")`
in its place; the docstring above it is the contract.
"""
import ast
import inspect
import itertools
import os
import pathlib
import re
import shutil

from llama import TuluError

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
EXERCISE_BEGIN, EXERCISE_END = re.compile(r"( *)# exercise: (\w+)$"), re.compile(r"( *)# end exercise$")


def find_exercises(path: str) -> dict[str, tuple[int, int]]:
    """{name: (begin, end)}, the 0-based lines of each `# exercise: name` marker in a file
    and of the `# end exercise` that closes it at the same indentation. A marker left
    open, closed twice, nested, repeated or misspelt, or a line between two markers less
    indented than they are: TuluError."""
    blocks, current = {}, None  # current: (name, line, indent) of the open marker
    for i, line in enumerate(pathlib.Path(path).read_text().splitlines()):
        where = f"{path}:{i + 1}"
        begin, end = EXERCISE_BEGIN.fullmatch(line.rstrip()), EXERCISE_END.fullmatch(line.rstrip())
        if not (begin or end) and line.lstrip().startswith(("# exercise", "# end exercise")):
            raise TuluError(f"{where}: malformed exercise marker {line.strip()!r}")
        if begin and current:
            raise TuluError(f"{where}: exercise {begin[2]!r} starts inside exercise {current[0]!r}")
        if begin and begin[2] in blocks:
            raise TuluError(f"{where}: a second exercise {begin[2]!r}")
        if begin:
            current = (begin[2], i, begin[1])
        elif end and (not current or end[1] != current[2]):
            raise TuluError(f"{where}: '# end exercise' without an '# exercise:' above it "
                            "at that indentation")
        elif end:
            blocks[current[0]], current = (current[1], i), None
        elif current and line.strip() and not line.startswith(current[2]):
            raise TuluError(f"{where}: less indented than the marker of exercise {current[0]!r} above it")
    if current:
        raise TuluError(f"{path}:{current[1] + 1}: exercise {current[0]!r} has no '# end exercise'")
    return blocks


def find_function(tree: ast.Module, qualname: str):
    """The def of `name` or `Class.name` at the top of a module, or None."""
    node = tree
    for part in qualname.split("."):
        defs = (n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
        if (node := next((n for n in defs if n.name == part), None)) is None:
            return None
    return node


def exercise_blocks(src_root: str) -> dict[str, dict[str, tuple[int, int]]]:
    """{file: find_exercises(file)}, checked against EXERCISES: each exercise marked once,
    inside its function, in its file, and no marker EXERCISES does not list."""
    found = {f: find_exercises(os.path.join(src_root, f)) for f in EXERCISE_FILES}
    for name, (file, function, _, _) in EXERCISES.items():
        if name not in found[file]:
            raise TuluError(f"{os.path.join(src_root, file)}: no '# exercise: {name}' marker "
                            f"(machinery/exercises.py puts it in {function})")
    for file, blocks in found.items():
        path = os.path.join(src_root, file)
        tree = ast.parse(pathlib.Path(path).read_text(), path)
        for name, (begin, _) in blocks.items():
            if name not in EXERCISES or EXERCISES[name][0] != file:
                raise TuluError(f"{path}:{begin + 1}: exercise {name!r} "
                                "is not in machinery/exercises.py's EXERCISES")
            fn = find_function(tree, EXERCISES[name][1])
            if fn is None or not fn.lineno < begin + 1 <= fn.end_lineno:  # its indentation keeps it there
                raise TuluError(f"{path}:{begin + 1}: exercise {name!r} is not inside {EXERCISES[name][1]}")
    return found


def blank_exercises(text: str, blocks: dict[str, tuple[int, int]]) -> str:
    """`text` with each block, markers included, replaced by one `raise` line at the
    markers' indentation: the function still parses, and fails only when called."""
    lines = text.splitlines(keepends=True)
    for name, (begin, end) in sorted(blocks.items(), key=lambda kv: kv[1], reverse=True):  # bottom up
        indent = EXERCISE_BEGIN.fullmatch(lines[begin].rstrip())[1]
        lines[begin:end + 1] = [f'{indent}raise NotImplementedError("exercise {name}: see EXERCISES.md")\n']
    return "".join(lines)


def doc_summary(doc: str) -> str:
    """A docstring's first sentence on one line, and when its first paragraph ends with a
    colon, the indented formula lines after it (as a Markdown code block)."""
    lines = inspect.cleandoc(doc).splitlines() + [""]
    k = next(i for i, s in enumerate(lines) if not s.strip() or s.startswith(" "))  # paragraph's end
    text = " ".join(s.strip() for s in lines[:k])
    if end := re.search(r"\.(?=\s+[A-Z])", text):
        return text[:end.end()]
    if not text.endswith(":"):
        return text
    formula = itertools.takewhile(lambda s: s.strip() and s.startswith(" "),
                                  itertools.dropwhile(lambda s: not s.strip(), lines[k:]))
    return text + "\n\n" + "".join(f"    {s.strip()}\n" for s in formula).rstrip()


def exercises_md(src_root: str) -> str:
    """EXERCISES.md: how to work, then each exercise: what, what to read, the command."""
    rows, parts = [], []
    for k, (name, (file, function, read, selector)) in enumerate(EXERCISES.items(), start=1):
        source = pathlib.Path(src_root, file).read_text()
        first = find_function(ast.parse(source), function).body[0]
        # the docstring as written, so that an escape such as "\n" stays two characters
        doc = ast.get_source_segment(source, first) if isinstance(first, ast.Expr) else ""
        doc = re.sub(r'^[rR]?("""|\'\'\'|"|\')|("""|\'\'\'|"|\')$', "", doc)
        command = f"python -m pytest {selector}"
        rows.append(f"| {k} | `{name}` | {file}: `{function}` | `{command}` |")
        parts.append(f"## {k}. {name}\n\nImplement `{function}` in {file}: {doc_summary(doc)}\n\n"
                     f"Read first: {read}.\n\nGraded by: `{command}`\n")
    return "\n".join([
        "# Exercises", "",
        f"This is a student copy of tulu: the bodies of {len(EXERCISES)} key functions are replaced by",
        '`raise NotImplementedError("exercise <name>: see EXERCISES.md")`. For each one, read the',
        "docstring above the `raise`: it is the contract (formula, shapes, and the details the",
        "reference libraries' numbers depend on). Write the body in place of the `raise` and run the",
        "grading command until it passes. Work in this order: an exercise's tests may use the",
        "exercises before it, never one after it. `python -m pytest` runs every test: it fails exactly",
        "the grading tests of unfinished exercises, and skips the other tests that reach one",
        "(\"waits on exercise NAME\", see conftest.py) until it is done.", "",
        "| # | exercise | where | graded by |", "| --- | --- | --- | --- |", *rows, "", *parts])


def make_exercises(src_root: str, out_dir: str) -> list[str]:
    """Copy the project at src_root (its files, data/, machinery/ and tests/, no caches) to
    out_dir, with the body of every exercise replaced by a `raise`, and EXERCISES.md.
    Returns the exercise names, in order. The markers are checked before anything is written."""
    src, out = os.path.realpath(src_root), os.path.realpath(out_dir)
    copied = [os.path.join(src, d) for d in STUDENT_COPY if os.path.isdir(os.path.join(src, d))]
    if out == src or any(out == d or out.startswith(d + os.sep) for d in copied):
        raise TuluError(f"{out_dir}: is the project, or inside a folder of it that the copy takes; "
                        "choose another")
    found = exercise_blocks(src_root)
    os.makedirs(out_dir, exist_ok=True)
    for name in STUDENT_COPY:
        src, dst = os.path.join(src_root, name), os.path.join(out_dir, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*NOT_COPIED), dirs_exist_ok=True)
        elif os.path.exists(src):  # README.md may not exist yet
            shutil.copy2(src, dst)
    for file, blocks in found.items():
        text = pathlib.Path(src_root, file).read_text()
        pathlib.Path(out_dir, file).write_text(blank_exercises(text, blocks))
    pathlib.Path(out_dir, "EXERCISES.md").write_text(exercises_md(src_root))
    return list(EXERCISES)
