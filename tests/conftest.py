import os
import sys
from pathlib import Path

# One intra-op thread: CI has 2 cores, and several tests start worker processes of their own. Thread fights
# made single tests 10-30x slower; results do not depend on this (CPU kernels are deterministic either way).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
