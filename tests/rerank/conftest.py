"""Every rerank test starts and ends with an empty database cache."""

import pytest

from retrbench.rerank import clear_cache


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()
