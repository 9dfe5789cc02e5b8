"""Suite-wide settings: one torch thread per test process (the machine has 2 cores and tests
start their own workers; oversubscribed threads make small models tens of times slower), and no
Ray started behind a test's back: a Ray call before any ``ray.init`` raises instead of starting a
default Ray, which would listen on the machine's routable address (Ray reads this switch when it
is first imported, so it is set before anything imports it)."""
import os

os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

import torch  # noqa: E402

torch.set_num_threads(1)
