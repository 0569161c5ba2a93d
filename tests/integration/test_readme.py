"""README.md's code blocks run, in order, as a new user would run them from a fresh clone: the
blocks before the training command's heading (the rest: ``test_readme_training.py``), the
conventions (``tests/readme_blocks.py``: substitutions and skips), and the install and test
commands that ``.ci/run`` runs."""

from __future__ import annotations

import shlex
from typing import List

import pytest

from tests.readme_blocks import README, ROOT, RUN_LANGS, SECOND_PART, parse_readme, run_part


def test_every_block_is_run_or_says_why_not():
    blocks = parse_readme(README.read_text())
    runnable = [b for b in blocks if b.lang in RUN_LANGS]
    assert runnable, "no bash/python blocks found"
    for b in blocks:
        # Another language would silently not run: name it here when one is added.
        assert b.lang in RUN_LANGS + ("", "text"), f"{b.label()}: unknown fence language {b.lang!r}"
        if b.lang not in RUN_LANGS:
            assert b.skip is None and not b.substitutions, f"{b.label()}: directive on a block that never runs"
    # Indented (unfenced) code blocks would escape the test: the README has none.
    lines = README.read_text().splitlines()
    fenced = False
    for n, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("    ") and n and not lines[n - 1].strip():
            raise AssertionError(f"README.md:{n + 1}: indented code block; fence it (```bash)")


def test_ci_runs_the_readme_install_and_test_commands():
    def commands(text: str) -> List[List[str]]:
        out = []
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            words = shlex.split(line) if line and not line.startswith("#") else []
            if words[:3] == ["python", "-m", "pip"]:
                words = words[2:]
            if words[:2] == ["pip", "install"] or words[:3] == ["python", "-m", "pytest"]:
                out.append([w for w in words if w != "-q"])
        return out

    blocks = [b for b in parse_readme(README.read_text()) if "python -m pytest" in b.code]
    assert len(blocks) == 1, "expected one README block with the test commands"
    assert blocks[0].skip, "the install block cannot run inside the test suite"
    readme = commands(blocks[0].code)
    ci = commands((ROOT / ".ci" / "run").read_text())
    assert readme == ci, f"README {readme} != .ci/run {ci}"
    # From the default index alone the torch pin resolves the CUDA build: the install line names
    # the CPU index, and the test extra pins the CPU build's version.
    install = next(c for c in readme if c[:2] == ["pip", "install"])
    assert "--extra-index-url" in install and "https://download.pytorch.org/whl/cpu" in install
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.replace(" ", "").startswith("torch==") for r in extras["test"]), extras["test"]


def test_the_second_part_starts_at_its_heading():
    blocks = [b for b in parse_readme(README.read_text()) if b.lang in RUN_LANGS and not b.skip]
    parts = [b.part for b in blocks]
    assert parts == sorted(parts) and set(parts) == {1, 2}, f"no {SECOND_PART!r} heading in README.md?"


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path):
    work, namespace = run_part(1, tmp_path, at_least=8)
    # What the blocks claim, checked on their tiny stand-ins.
    import jax_adapter

    # The trunk ran on the padded 20x50 images: 2x4 patches of the tiny trunk's width 96.
    assert namespace["out"].patches.shape == (1, 8, 96)
    assert namespace["trained"].backbone.cfg.embed_dim == 96
    trained = jax_adapter.load_pretrained(str(work / "adapter_trained"))
    assert type(trained).__name__ == "DinoV2Adapter"
    assert (work / "adapter_trained.pth").is_file() and (work / "trunk.safetensors").is_file()
    assert type(jax_adapter.load_pretrained(str(work / "seg7b"))).__name__ == "DinoV3Adapter"
    assert type(jax_adapter.load_pretrained(str(work / "vitl16"))).__name__ == "DinoV3"
    assert (work / "adapter.pth").is_file() and (work / "trunk.pth").is_file()
    assert namespace["tokens"].registers.shape[1] == 4  # DINOv3 storage tokens
