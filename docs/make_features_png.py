"""Regenerates ``docs/features.png``, the README's ``jax-adapter show`` picture, offline.

Weights: the tiny adapter test fixture (``tests/fixtures/seed_adapter_tiny.pth``: 96 wide, 4
blocks, random weights perturbed around the reference's initialisation; no pretrained weights can
be shipped in the repository). Image: the demo's synthetic street picture at 224x392.

    python docs/make_features_png.py
"""

import os
import subprocess
import sys
import tempfile

from PIL import Image

from jax_adapter.preprocessing import to_display
from jax_adapter.training.synthetic import street_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

with tempfile.TemporaryDirectory() as tmp:
    street = os.path.join(tmp, "street.png")
    Image.fromarray(to_display(street_image(224, 392))).save(street)
    ckpt = os.path.join(tmp, "adapter")
    cli = [sys.executable, "-m", "jax_adapter.cli"]
    subprocess.run(cli + ["convert", os.path.join(FIXTURES, "seed_adapter_tiny.pth"), ckpt, "--config",
                          os.path.join(FIXTURES, "seed_adapter_tiny.json")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(cli + ["show", ckpt, street, "-o", os.path.join(ROOT, "docs", "features.png"),
                          "--size", "224x392", "--tile-height", "160"], check=True)
