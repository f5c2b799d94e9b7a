"""Suite-wide settings.

Tests run single-threaded: their tensors are small, so intra-op threads only add overhead, and
on a busy 2-core machine two OpenMP threads per process were measured up to 30x slower
(oversubscription). Hypothesis profiles are bounded per test with explicit settings.
"""

import torch

torch.set_num_threads(1)
