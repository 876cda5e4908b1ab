import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # shared model definitions (tests/reparam_models.py)


import os
import shutil

import pytest

CROSS_TOOLS = ("aarch64-linux-gnu-g++", "riscv64-linux-gnu-g++", "qemu-aarch64", "qemu-riscv64",
               "riscv64-unknown-elf-gcc", "qemu-system-riscv32")


def pytest_collection_modifyitems(config, items):
    """The cross tier needs cross toolchains and qemu-user: `make test` installs them and sets
    FXOPT_REQUIRE_CROSS=1, so there a missing tool fails the tests instead of skipping them."""
    missing = [tool for tool in CROSS_TOOLS if shutil.which(tool) is None]
    if not missing or os.environ.get("FXOPT_REQUIRE_CROSS") == "1":
        return
    skip = pytest.mark.skip(reason=f"cross tier needs {', '.join(missing)}: apt-get install g++-aarch64-linux-gnu "
                                   "g++-riscv64-linux-gnu qemu-user gcc-riscv64-unknown-elf "
                                   "picolibc-riscv64-unknown-elf qemu-system-misc (make test does)")
    for item in items:
        if "cross" in item.keywords:
            item.add_marker(skip)
