"""Raw inputs built once per session, and one reference conversion the other tests compare with."""

from pathlib import Path

import pytest

from data_prep import prepare
from tests.data_prep.inputs import build_media, good_samples, tiny_config, write_jsonl, write_tar
from xoron_dist.data.schema import Manifest


@pytest.fixture(scope="session")
def media_root(tmp_path_factory) -> Path:
    """images/, audio/, video/ plus samples.jsonl and tar/samples.tar holding the same samples."""
    root = tmp_path_factory.mktemp("raw")
    build_media(root)
    write_jsonl(root / "samples.jsonl", good_samples())
    (root / "tar").mkdir()
    write_tar(root / "tar" / "samples.tar", good_samples(), root)
    return root


@pytest.fixture(scope="session")
def reference(media_root, tmp_path_factory) -> tuple[Path, Manifest]:
    """samples.jsonl prepared in this process with ``tiny_config()``."""
    out = tmp_path_factory.mktemp("reference") / "out"
    return out, prepare([media_root / "samples.jsonl"], out, tiny_config(), progress=False)
