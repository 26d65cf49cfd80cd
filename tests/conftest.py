"""Shared pytest fixtures."""
from pathlib import Path

import pytest

# ---- data fixtures (issue 3: moma_hf/data.py, moma_hf/transforms.py) ------------------------------
# The real H&E patches live beside the repository, read-only in CI (see ../shared/data/README.md).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: launches several processes with `accelerate launch` (slow)")


@pytest.fixture(scope="session")
def nct_mini_dir() -> Path:
    """nct-crc-mini: 129 real 224x224 patches, 9 classes, class folders only (no split folders)."""
    return SHARED_DATA / "nct-crc-mini"


@pytest.fixture(scope="session")
def crc_polyp_dir() -> Path:
    """crc-polyp-96: 16,500 real 96x96 patches, 5 classes, train/ and test/ split folders."""
    return SHARED_DATA / "crc-polyp-96"


# ---- end of data fixtures ---------------------------------------------------------------------------
