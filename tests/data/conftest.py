"""Fixtures of the Arrow loader tests: the tiny preset's tokenizer, built once."""

import pytest

from xoron_dist.config import XoronConfig
from xoron_dist.tokenizer import XoronTokenizer, build_tokenizer


@pytest.fixture(scope="session")
def arrow_tokenizer() -> XoronTokenizer:
    return build_tokenizer(XoronConfig.preset("tiny"))
