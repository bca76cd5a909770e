"""Shared test set-up: where the real data is, and a private cache folder for the whole session.

The real Omniglot files are found through ``LIT_META_DATA`` (default: ``../shared/data`` next to
the repository); the test session never writes to the user's cache.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LIT_META_DATA", REPO.parent / "shared" / "data")).resolve()
os.environ["LIT_META_DATA"] = str(DATA)


def pytest_configure(config):
    cache = config.rootpath / ".pytest_cache" / "lit_meta_cache"
    os.environ.setdefault("LIT_META_CACHE", str(cache))


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    path = DATA / "omniglot"
    if not (path / "images_background_small1.zip").is_file():
        pytest.fail(f"real Omniglot not found at {path}: set LIT_META_DATA to the folder holding omniglot/")
    return path
