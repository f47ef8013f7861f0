"""Imported first by a process that a test starts: records in :data:`opened` every safetensors file the process
opens (``safetensors.safe_open`` is what transformers reads weights with and what ``check_model_dir`` reads headers
with), so the test can tell which process read the weight files. Import it before transformers."""

import os

import safetensors
import safetensors.torch

opened: list[str] = []
_real_open = safetensors.safe_open


def _counting_open(path, *args, **kwargs):
    opened.append(os.path.realpath(path))
    return _real_open(path, *args, **kwargs)


safetensors.safe_open = safetensors.torch.safe_open = _counting_open
