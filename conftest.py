"""pytest setup: the project's modules import from the repository root, torch
uses one thread (TULU_TEST_THREADS to change it) -- the test models are tiny, and
two threads on a busy 2-core machine are slower than one -- every test starts
from the same seed, and nothing is written to the user's ~/.cache.

In a student copy (`python tulu.py exercises`, recognised by its EXERCISES.md),
an unfinished exercise raises NotImplementedError("exercise NAME: see
EXERCISES.md"). Its grading tests fail on it; any other test that reaches it is
reported as skipped, waiting on NAME, so that `pytest` there fails exactly the
exercises' grading tests. Outside a student copy every failure stays a failure."""
import os
import re
import sys

THREADS = int(os.environ.get("TULU_TEST_THREADS", "1"))  # tests/cpu_matrix.sh also runs with 2
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))  # inherited by the command-line tests' subprocesses
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)

UNFINISHED = re.compile(r"exercise (\w+): see EXERCISES\.md")
STUDENT_COPY = os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "EXERCISES.md"))


def grades_an_exercise(item):
    """Whether an exercise's grading command (`pytest FILE -k WORD`) selects this test."""
    from machinery.exercises import EXERCISES
    for _, _, _, selector in EXERCISES.values():
        file, _, word = selector.partition(" -k ")
        if item.nodeid.startswith(file + "::") and word.lower() in item.name.lower():
            return True
    return False


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """The tests never write into the user's ~/.cache: the tiny demo model and the
    encoded-data cache go to a folder of the session ($XDG_CACHE_HOME, which the
    `python tulu.py` processes that tests start inherit). So do --compile's kernels:
    inductor's shared cache in /tmp does not tell the instruction sets apart, and
    tests/cpu_matrix.sh changes them between runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor_cache")))
        yield


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global random state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    r = report.get_result()
    if STUDENT_COPY and r.failed and call.excinfo is not None:
        waits = UNFINISHED.search(r.longreprtext)
        if waits and not grades_an_exercise(item):
            r.outcome, r.longrepr = "skipped", (str(item.path), item.location[1], f"waits on exercise {waits[1]}")
