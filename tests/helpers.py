"""What the test files share: the repository root, the environment their subprocesses run in,
and the one trained model's recipe (conftest.py's `trained` fixture)."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINED_MODEL = "convnext_tiny_3M_pruned_cifar10"
TRAINED_RECIPE = ["--data_set", "DIGITS", "--num_workers", "0", "--device", "cpu", "--input_size", "32",
                  "--batch_size", "128", "--warmup_epochs", "0", "--aa", "none", "--reprob", "0",
                  "--mixup", "0", "--cutmix", "0"]
# One intra-op thread: on a busy 2-core machine, two spinning threads per process are far slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
