import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # shared model definitions (tests/reparam_models.py)
