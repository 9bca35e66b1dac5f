import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def fedmed_cache(tmp_path_factory):
    """Built models go to FEDMED_CACHE (CI sets it; else one temp dir per session)."""
    if not os.environ.get("FEDMED_CACHE"):
        os.environ["FEDMED_CACHE"] = str(tmp_path_factory.mktemp("fedmed_cache"))
    return Path(os.environ["FEDMED_CACHE"])


@pytest.fixture(scope="session")
def tiny_model_path(fedmed_cache):
    from fedmed_components.modeling import resolve_model

    return resolve_model("tiny")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the project")
    return SHARED_DATA
