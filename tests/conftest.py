"""Test-wide settings: one torch thread (the suite runs beside other jobs on 2
cores, where 2 threads were measured 4-10x slower), non-interactive matplotlib."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
