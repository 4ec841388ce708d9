"""Tolerances of the kernel tests, shared by the GPU tier (test_gpu_kernels.py) and the CPU execution harness tier
(test_cpu_harness.py), so a kernel is held to the same bar wherever it runs: max |err| / max |ref| against a
float64 PyTorch reference (dsincubate/ops/reference.py).
"""

import torch

LN_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
ATTN_TOL = {torch.bfloat16: 3e-2, torch.float16: 6e-3}
