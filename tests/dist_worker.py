"""What tests/test_distributed.py starts under torchrun: tulu's command line, with a
fault that the test asks for through the environment, on the rank TULU_TEST_RANK only:

    TULU_TEST_SIGTERM_AT=N    the rank sends itself SIGTERM during its N-th micro-batch,
                              as a scheduler's signal may reach one rank before the others
    TULU_TEST_NO_DATA=1       the rank's --data names a file that does not exist, as on a
                              node that lacks it
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tulu  # noqa: E402

if os.environ.get("RANK") == os.environ.get("TULU_TEST_RANK"):
    if os.environ.get("TULU_TEST_SIGTERM_AT"):
        calls, at = [], int(os.environ["TULU_TEST_SIGTERM_AT"])
        for task in (tulu.SFTTask, tulu.DPOTask):
            def loss(self, *a, _loss=task.loss, **kw):
                calls.append(1)
                if len(calls) == at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return _loss(self, *a, **kw)
            task.loss = loss
    if os.environ.get("TULU_TEST_NO_DATA"):
        argv = sys.argv[1:]
        argv[argv.index("--data") + 1] += ".missing"
        sys.argv[1:] = argv

tulu.exit_after(lambda: tulu.main(sys.argv[1:]))
