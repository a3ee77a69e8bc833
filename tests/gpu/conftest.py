"""GPU tests: collected only where MLX has a CUDA device (`python -m pytest tests/gpu`
on the GPU machine); elsewhere this folder is skipped without noise."""

import mlx.core as mx

if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
    collect_ignore_glob = ["test_*.py"]
