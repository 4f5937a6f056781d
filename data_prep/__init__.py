"""Raw media and webdataset tars -> Arrow shards + manifest (``xoron prep``); see README.md."""

from data_prep.convert import prepare
from data_prep.errors import PrepError, RejectedSample

__all__ = ["PrepError", "RejectedSample", "prepare"]
