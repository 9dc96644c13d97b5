import os
import signal
import sys

# the tests' fault injection (tests/plugins/ccpcsa_faults.py), importable by the tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins"))

# Ray started by the tests (ray.init, `ray start`) binds its node to 127.0.0.1: with this
# (Ray's own switch for single-machine use) it does not resolve 127.0.0.1 to the host's address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# A shell starts background jobs with SIGINT ignored, and a child started with SIGINT ignored
# never gets Python's KeyboardInterrupt: the tests that press Ctrl-C on a run (send SIGINT)
# would then wait for it in vain. Handlers reset to the default across exec, so this gives the
# runs these tests start the SIGINT a user's terminal gives them.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores in CI: keep torch from oversubscribing them when Ray workers run beside the tests.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Modules whose tests start Ray or run whole searches: `make test-fast` (pytest -m "not slow")
# leaves them out for the inner loop; `make test` (and CI) runs everything.
SLOW_MODULES = {
    "test_search", "test_two_phase", "test_local_job", "test_distributed", "test_datapath",
    "test_reliability", "test_zoo", "test_syncbn", "test_weights", "test_capacity",
    "test_depth_search", "test_feed", "test_rehearsal", "test_search_faults",
    "test_storage_s3",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
