"""Test-wide settings: never wait on a model hub; deterministic CPU math."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.use_deterministic_algorithms(True, warn_only=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, excluded from `make test` (run with `make test-slow`)")
