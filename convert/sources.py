"""Per-source key converters: small pure functions from a source's names to the seed names.

The seed DinoAdapter's ``state_dict`` names (which the DINOv2 hub's names are a subset of) are the
project's PyTorch-side canonical names; :mod:`convert.keys` maps those onto modules.
"""

from __future__ import annotations

import re
from typing import Dict

import numpy as np

_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def from_dinov2_hub(sd: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """DINOv2 hub ``.pth``: drop ``mask_token``; un-chunk ``blocks.<chunk>.<N>.`` keys."""
    out = {}
    for key, v in sd.items():
        if key == "mask_token":
            continue  # used only by masked pretraining
        out[_CHUNKED.sub(r"blocks.\1.", key)] = v
    return out
