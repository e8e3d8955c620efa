import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "mxnet"  # a copy of the workplace's shared/fixtures (1.9 MB)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"MXNet fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory) -> Path:
    """A tiny generated dataset in VOC layout (12 train, 6 val images of 64 px), shared read-only."""
    from voc12.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("tiny") / "VOC"
    make_demo_dataset(root, num_train=12, num_val=6, image_size=64, seed=3)
    return root
