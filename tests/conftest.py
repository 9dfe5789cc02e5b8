"""Suite-wide settings: one torch thread per test process (the machine has 2 cores and tests
start their own workers; oversubscribed threads make small models tens of times slower), and no
Ray started behind a test's back: a Ray call before any ``ray.init`` raises instead of starting a
default Ray, which would listen on the machine's routable address (Ray reads this switch when it
is first imported, so it is set before anything imports it)."""
import os

os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

import torch  # noqa: E402

torch.set_num_threads(1)


#: the test files that take longest, longest first (measured with ``--durations=0``).  ``make
#: test`` runs whole files on parallel workers in collection order (``--dist=loadfile
#: --no-loadscope-reorder``), so these start first and the workers finish close together,
#: instead of a long file starting last and running alone at the end
LONGEST_FIRST = (
    "search/test_slurm.py",
    "search/test_robustness.py",
    "search/test_failures.py",
    "search/test_multinode_faults.py",
    "search/test_launch.py",
    "search/test_driver_lock.py",
    "search/test_plugin_study.py",
    "search/test_ray_jobs.py",
    "search/test_multinode.py",
    "dashboard/test_browser.py",
    "search/test_pruning.py",
    "workloads/test_hf.py",
    "search/test_data_parallel.py",
    "test_containers.py",
)


def pytest_collection_modifyitems(session, config, items):
    here = os.path.dirname(__file__)

    def rank(item):
        path = os.path.relpath(str(item.path), here).replace(os.sep, "/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every file keeps its own order, the others theirs
