"""Suite-wide settings: one torch thread per test process (the machine has 2 cores and tests
start their own workers; oversubscribed threads make small models tens of times slower)."""
import torch

torch.set_num_threads(1)
