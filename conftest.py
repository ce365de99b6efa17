"""pytest setup: the project's modules import from the repository root, and torch
uses one thread -- the test models are tiny, and two threads on a busy 2-core
machine are slower than one."""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the command-line tests' subprocesses
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)
