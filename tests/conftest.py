import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import modelrecon  # noqa: E402

from tiny import FAMILIES, tiny_model  # noqa: E402

PROMPTS = ["Hello there, world!", "Hi", "The quick brown fox jumps"]


@pytest.fixture(scope="session", params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model; the Makefile installs its package."""
    return modelrecon.load("smollm2-135m")
