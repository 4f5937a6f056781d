"""``xoron generate``: text, images, videos and speech from an export or a checkpoint (``cli.py``)."""
