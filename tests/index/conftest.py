import sys
from pathlib import Path

import pytest

# The suite runs with --import-mode=importlib (no sys.path changes): make the helpers importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from index_testlib import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
