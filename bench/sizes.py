"""The readability budgets of ../shared/DESIGN.md, measured: lines per chapter and in all
run-time Python (the chapters plus machinery/), functions over 45 lines, lines over 110
characters, definitions that use a name defined further down their file (the command
line at the bottom of tulu.py excepted), and README.md's length.

    python bench/sizes.py          # prints a table; exit status 1 if a budget is broken
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAPTERS = {"llama.py": 850, "nf4.py": 450, "lora.py": 320, "dpo.py": 170, "tulu.py": 650}
TOTAL, FUNCTION, LINE, README = 3800, 45, 110, 400
COMMAND_LINE = "# The command line"  # tulu.py's last chapter may use names defined anywhere


def runtime_files() -> list[str]:
    package = os.path.join(ROOT, "machinery")
    extra = sorted(os.path.join("machinery", n) for n in os.listdir(package) if n.endswith(".py")) \
        if os.path.isdir(package) else []
    return list(CHAPTERS) + extra


def long_functions(tree) -> list[str]:
    return [f"{n.name} ({n.end_lineno - n.lineno + 1})" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > FUNCTION]


def top_names(node) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def forward_uses(tree, text: str) -> list[str]:
    """'user -> name' where a top-level definition uses a top-level name bound further down."""
    stop = text.find(COMMAND_LINE)
    stop_line = text[:stop].count("\n") + 1 if stop >= 0 else 10**9
    where = {}
    for node in tree.body:
        for name in top_names(node):
            where.setdefault(name, node.lineno)
    found = []
    for node in tree.body:
        if node.lineno >= stop_line:
            break
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        found += [f"{(top_names(node) or ['?'])[0]} -> {u}" for u in sorted(used)
                  if where.get(u, 0) > node.lineno]
    return found


def main() -> int:
    broken, total = [], 0
    print(f"{'file':<26} {'lines':>6} {'budget':>6}  long functions / long lines / forward uses")
    for name in runtime_files():
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        lines, tree = text.count("\n"), ast.parse(text)
        total += lines
        budget = CHAPTERS.get(name)
        longs = [i + 1 for i, line in enumerate(text.split("\n")) if len(line) > LINE]
        funcs, fwd = long_functions(tree), forward_uses(tree, text)
        print(f"{name:<26} {lines:>6} {budget or '':>6}  {len(funcs)} / {len(longs)} / {len(fwd)}")
        for what, items in (("function over 45 lines", funcs), ("line over 110", longs), ("forward use", fwd)):
            for item in items:
                print(f"    {what}: {item}")
        broken += [name] * bool((budget and lines > budget) or funcs or longs or fwd)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read().count("\n")
    print(f"{'run-time Python':<26} {total:>6} {TOTAL:>6}\n{'README.md':<26} {readme:>6} {README:>6}")
    broken += ["total"] * (total > TOTAL) + ["README.md"] * (readme > README)
    print("within every budget" if not broken else f"over budget: {', '.join(dict.fromkeys(broken))}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
