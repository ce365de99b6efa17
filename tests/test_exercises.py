"""Exercise mode: `python tulu.py exercises OUT_DIR` writes a student copy in
which each exercise's body is a `raise NotImplementedError`, and EXERCISES.md.

The round trip is checked as a student works: in the order of ex.EXERCISES,
each exercise's grading tests fail in the copy, and pass once its original body
is put back (with those of the exercises before it). The grading tests run with
pytest inside this process, one file and one -k at a time, on the copy's modules;
a fresh interpreter per run would spend most of the time importing torch.
"""
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import machinery.exercises as ex
import tulu
from llama import TuluError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def message(name):
    return f"exercise {name}: see EXERCISES.md"


def raise_line(name):
    return f'raise NotImplementedError("{message(name)}")'


def read(path):
    with open(path) as f:
        return f.read()


# -----------------------------------------------------------------------------
# The markers and the table


def test_every_exercise_is_marked_once_and_has_grading_tests():
    """Each exercise of ex.EXERCISES has balanced markers inside its function
    (ex.exercise_blocks raises otherwise), and its command selects tests of its
    file whose names contain the exercise's name."""
    blocks = ex.exercise_blocks(ROOT)
    assert sorted(name for b in blocks.values() for name in b) == sorted(ex.EXERCISES)
    for name, (file, function, read_first, selector) in ex.EXERCISES.items():
        test_file, k = re.fullmatch(r"(tests/test_\w+\.py) -k (\w+)", selector).groups()
        tests = re.findall(r"^def (test_\w+)", read(os.path.join(ROOT, test_file)), re.M)
        assert name in k and [t for t in tests if k in t], (name, selector)
        assert name in blocks[file] and read_first


def move_rms_norm_markers_into_the_module(s):
    s = s.replace("    # exercise: rms_norm\n", "").replace("    # end exercise\n", "", 1)  # rms_norm's comes first
    call = "        return rms_norm(x, self.weight, self.eps)\n"
    return s.replace(call, f"        # exercise: rms_norm\n{call}        # end exercise\n")


UNPAIRED = "an exercise marker outside a pair"


@pytest.mark.parametrize("file,edit,message", [
    ("llama.py", lambda s: s + "# exercise: late\n", UNPAIRED),  # left open
    ("llama.py", lambda s: s.replace("    # exercise: apply_rope\n", ""), UNPAIRED),  # closed without an opening
    ("llama.py", lambda s: s.replace("    # end exercise\n", "", 1), UNPAIRED),  # rms_norm's closed by apply_rope's end
    ("llama.py", lambda s: s.replace("    # exercise: apply_rope\n", "    # exercise: apply_rope\n    # exercise: rope\n"),
     UNPAIRED),  # nested
    ("llama.py", lambda s: s.replace("    # exercise: apply_rope\n", "    # exercise apply_rope\n"), UNPAIRED),  # misspelt
    ("llama.py", lambda s: s.replace("    # exercise: apply_rope\n", "    # exercise: rms_norm\n"),
     "a second exercise 'rms_norm'"),
    ("llama.py", move_rms_norm_markers_into_the_module, "exercise 'rms_norm' is not inside rms_norm"),
    ("dpo.py", lambda s: "".join(s.replace("    # exercise: dpo_loss\n", "").rsplit("    # end exercise\n", 1)),
     "no '# exercise: dpo_loss' marker"),
    ("dpo.py", lambda s: s.replace("    # exercise: dpo_loss\n", "    # exercise: ipo_loss\n"),
     "no '# exercise: dpo_loss' marker"),
    ("lora.py", lambda s: s + "\n\ndef f():\n    # exercise: extra\n    pass\n    # end exercise\n",
     "exercise 'extra' is not in machinery/exercises.py's EXERCISES"),
])
def test_unbalanced_or_missing_markers_are_errors(tmp_path, file, edit, message):
    """A wrong marker is an error that names the file, and nothing is written."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ex.EXERCISE_FILES:
        shutil.copy(os.path.join(ROOT, f), src / f)
    (src / file).write_text(edit(read(src / file)))
    with pytest.raises(TuluError, match=re.escape(message)) as e:
        ex.make_exercises(str(src), str(tmp_path / "out"))
    assert str(src / file) in str(e.value)
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# The student copy


@pytest.fixture(scope="module")
def student_copy(tmp_path_factory):
    """`python tulu.py exercises OUT_DIR`, as a user types it."""
    out = tmp_path_factory.mktemp("exercises") / "student"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tulu.py"), "exercises", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    first = next(iter(ex.EXERCISES))
    assert str(out) in p.stdout and "EXERCISES.md" in p.stdout and ex.EXERCISES[first][3] in p.stdout
    return str(out)


def test_student_copy_blanks_only_the_exercise_bodies(student_copy):
    """Putting each exercise's original lines back in place of its `raise` gives
    the project's files byte for byte; the copy has the tests and data, not this file."""
    for file, found in ex.exercise_blocks(ROOT).items():
        student, original = read(os.path.join(student_copy, file)), read(os.path.join(ROOT, file))
        for name, block in found.items():
            assert student.count(raise_line(name)) == 1
            student = re.sub(rf"^ *{re.escape(raise_line(name))}\n", lambda m: block[0], student, flags=re.M)
        assert student == original, file
    for f in ("conftest.py", "machinery/exercises.py", "tests/test_llama.py", "tests/fixtures/nf4/quantized.safetensors", "data/sft_train.jsonl"):
        assert os.path.exists(os.path.join(student_copy, f)), f
    assert not os.path.exists(os.path.join(student_copy, "tests", "test_exercises.py"))


def test_grading_command_as_a_student_types_it(student_copy):
    """The first exercise's command, run in the copy: its test fails on the `raise`."""
    name, (file, function, _, selector) = next(iter(ex.EXERCISES.items()))
    p = subprocess.run([sys.executable, "-m", "pytest", *shlex.split(selector), "-p", "no:cacheprovider"],
                       cwd=student_copy, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and f"NotImplementedError: {message(name)}" in p.stdout


def test_exercises_md_lists_what_to_read_and_the_grading_command(student_copy):
    """One section per exercise, in order: the function, what to read, the command."""
    md = read(os.path.join(student_copy, "EXERCISES.md"))
    for k, (name, (file, function, read_first, selector)) in enumerate(ex.EXERCISES.items(), start=1):
        section = md.split(f"## {k}. {name}\n")[1].split("\n## ")[0]
        assert f"`{function}` in {file}" in section and read_first in section
        assert f"`python -m pytest {selector}`" in section


def test_exercises_refuses_a_non_empty_folder_unless_forced(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        tulu.main(["exercises", str(tmp_path)])
    assert e.value.code == 1 and "not empty" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    tulu.main(["exercises", str(tmp_path), "--force"])
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "EXERCISES.md").exists()
    for inside in (ROOT, os.path.join(ROOT, "tests", "student")):  # the copy would copy itself, or blank the project
        with pytest.raises(TuluError, match="is the project, or inside a folder of it"):
            ex.make_exercises(ROOT, inside)
    assert not os.path.exists(os.path.join(ROOT, "tests", "student"))


# -----------------------------------------------------------------------------
# The round trip: each exercise's tests fail, then pass with the original body


class Outcomes:
    """A pytest plugin that keeps each test's outcome, "passed", "skipped" or the
    failure's text: a failed or skipped setup's, else the call's."""

    def __init__(self):
        self.by_test = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.by_test[report.nodeid] = report.longreprtext if report.failed else report.outcome


@contextlib.contextmanager
def modules_of(root):
    """Imports of the project's modules and tests resolve to `root` inside the
    block, as if Python had started there; sys.modules and sys.path come back after."""
    # the project's modules are the .py files at a root, in its machinery/ or tests/; a virtual env
    # inside the clone (CI's .venv) is not ours: torch must never be imported twice
    ours = {f(os.path.join(d, sub)) for d in (ROOT, root) for sub in ("", "machinery", "tests")
            for f in (os.path.abspath, os.path.realpath)}

    def forget_ours():
        for name, m in list(sys.modules.items()):
            file = getattr(m, "__file__", None)
            if file and os.path.dirname(os.path.abspath(file)) in ours:
                del sys.modules[name]

    saved, path, cwd = dict(sys.modules), list(sys.path), os.getcwd()
    forget_ours()
    sys.path.insert(0, root)
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path[:] = path
        forget_ours()
        sys.modules.update({name: m for name, m in saved.items() if name not in sys.modules})


def grade(root, name=None):
    """{test: outcome} of exercise `name`'s grading command, or of the whole
    suite (name None), run in `root`."""
    args, rec = shlex.split(ex.EXERCISES[name][3]) if name else ["tests"], Outcomes()
    with modules_of(root):
        # no cache files in the copy; one-line tracebacks and no gc.collect() after each run: only speed
        pytest.main([*args, "-q", "--tb=line", "-p", "no:cacheprovider", "-p", "no:unraisableexception",
                     "--rootdir", root], plugins=[rec])
    return {t: o for t, o in rec.by_test.items() if o != "skipped"}  # e.g. tests that need Llama 2's tokenizer


def put_back(root, name):
    file = ex.EXERCISES[name][0]
    body = ex.exercise_blocks(ROOT)[file][name][0]
    student = read(os.path.join(root, file))
    with open(os.path.join(root, file), "w") as f:
        f.write(re.sub(rf"^ *{re.escape(raise_line(name))}\n", lambda m: body, student, count=1, flags=re.M))


def test_each_exercise_fails_in_the_copy_and_passes_with_its_body(student_copy, tmp_path):
    """`pytest` in the student copy fails exactly the grading tests (the others
    pass, or skip while they wait on an exercise). In ex.EXERCISES' order: every
    grading test of the exercise fails on its `raise`; with its body back (and
    those before it), every one passes."""
    root = str(tmp_path / "student")
    shutil.copytree(student_copy, root)  # this test writes bodies back: a copy of the copy
    failed = {t for t, outcome in grade(root).items() if outcome != "passed"}
    graded = set()
    for name in ex.EXERCISES:
        before = grade(root, name)
        assert before and all(message(name) in outcome for outcome in before.values()), (name, before)
        graded |= before.keys()
        put_back(root, name)
        after = grade(root, name)
        assert after.keys() == before.keys() and set(after.values()) == {"passed"}, (name, after)
    assert failed == graded, (sorted(failed - graded), sorted(graded - failed))


@pytest.mark.parametrize("student", [True, False])
def test_waiting_on_an_exercise_is_a_skip_only_in_a_student_copy(tmp_path, student):
    """A test that hits an unfinished exercise's error is reported as skipped in a
    student copy (which has EXERCISES.md), and stays a failure anywhere else: in the
    project itself a real failure must never pass as a skip."""
    shutil.copy(os.path.join(ROOT, "conftest.py"), tmp_path)
    os.makedirs(tmp_path / "tests")
    shutil.copytree(os.path.join(ROOT, "machinery"), tmp_path / "machinery")
    shutil.copy(os.path.join(ROOT, "llama.py"), tmp_path)  # machinery/exercises.py imports TuluError from it
    error = "exercise dpo_loss" + ": see EXERCISES" + ".md"  # spelt apart: this source must not match the hook
    (tmp_path / "tests" / "test_waits.py").write_text(
        f"def test_uses_a_later_exercise():\n    raise NotImplementedError({error!r})\n")
    if student:
        (tmp_path / "EXERCISES.md").write_text("# Exercises\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_waits.py"],
                       cwd=tmp_path, capture_output=True, text=True)
    last = p.stdout.strip().splitlines()[-1]  # "1 failed in ...": not the error's text, which the hook would match
    assert ("1 skipped" in last and p.returncode == 0) if student else ("1 failed" in last and p.returncode == 1), last
