import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# The suite runs tiny models: one thread avoids OpenMP oversubscription on small, shared machines.
torch.set_num_threads(1)
os.environ["KVLAB_THREADS"] = "1"  # and the CLI verbs called in-process keep it (kvlab/threads.py)
