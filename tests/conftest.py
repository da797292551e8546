import os
from typing import List

import pytest

from dpt_jax.cli import use_compilation_cache

# Many tests compile the same tiny programs (in-process and in subprocesses): share compilations.
use_compilation_cache()

# The files that take longest, longest first (seconds on 2 CPU cores with empty caches, 2026-11-28:
# 534, 302, 231, 204, 171, 122, 100, 96, 92; every other file under 50). `--dist loadfile` hands
# whole files to the two workers in collection order: longest first, each worker ends near half of
# the 2030 s total (about 1020 s), where xdist's own order (by number of tests) left one worker
# 1100 s with the other done at 930.
LONGEST_FIRST = ("test_train.py", "test_multihost.py", "test_lora.py", "test_sampler.py", "test_pretrain_demo.py",
                 "test_unet_vae_parity.py", "test_evaluate.py", "test_bench.py", "test_export.py")


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the collection order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))
