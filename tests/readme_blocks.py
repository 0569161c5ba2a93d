"""Running README.md's code blocks, in order, as a new user would from a fresh clone (the tests
are ``tests/integration/test_readme.py`` and ``test_readme_training.py``).

The ```bash and ```python blocks are run top to bottom in one scratch directory (bash blocks with
``bash -e``, python blocks in one shared namespace, so that a block may use an earlier block's
variables); other fences (plain ```, ```text) are not code to run. A block is run on small
substitutes so that the whole README takes a few minutes on 2 CPU cores:

* everywhere: the architectures ``dinov2_vitb14[_adapter]`` become ``dinov2_tiny[_adapter]`` and
  the size 256x704 becomes 56x84 (written ``256x704``, ``256, 704`` or ``h=256, w=704``;
  :data:`GLOBAL_SUBSTITUTIONS`);
* per block, an HTML comment on the line before the fence (blank lines between are allowed)::

      <!-- readme-test: substitute OLD -> NEW | OLD -> NEW -- optional comment -->
      <!-- readme-test: skip (why this block cannot run here) -->

  Each ``OLD`` must occur in its block (a stale substitution fails the test); a skip must give
  its reason. Blocks are never skipped otherwise.
* the source files the conversion examples name are tiny stand-ins made by :func:`_sources`.

The blocks run in two parts, each in its own scratch directory and test file, so that parallel
test workers take one each: the blocks from the heading :data:`SECOND_PART` on (the
command-line training runs and the memory benchmark) read nothing that earlier blocks write,
which their passing from an empty directory shows.

The install commands cannot run here; the test checks instead that ``.ci/run`` runs exactly the
README's test-install commands.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from typing import List, Optional, Tuple


ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIXTURES = ROOT / "tests" / "fixtures"
RUN_LANGS = ("bash", "python")
GLOBAL_SUBSTITUTIONS: Tuple[Tuple[str, str], ...] = (
    (r"\bdinov2_vitb14_adapter\b", "dinov2_tiny_adapter"),
    # The trunk (or its adapter, where an adapter is asked for); not dinov2_vitb14_reg4_pretrain.pth
    # ("_" is a word character) nor the weights dinov2_vitb14.lvd142m.
    (r"\bdinov2_vitb14\b(?!\.)", "dinov2_tiny"),
    (r"\b256x704\b", "56x84"),
    (r"\b256, 704\b", "56, 84"),
    (r"\bh=256, w=704\b", "h=56, w=84"),
)
DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(skip|substitute)\b(.*?)-->\s*$")
BLOCK_TIMEOUT_S = 600
# The heading where the second part starts (see the module docstring).
SECOND_PART = "### `jax-adapter train`"


@dataclasses.dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    part: int = 1  # 2 from the heading SECOND_PART on
    skip: Optional[str] = None
    substitutions: Tuple[Tuple[str, str], ...] = ()

    def label(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def _parse_directive(text: str, line: int) -> Tuple[Optional[str], Tuple[Tuple[str, str], ...]]:
    m = DIRECTIVE.match(text.strip())
    if not m:
        raise AssertionError(f"README.md:{line}: malformed readme-test comment {text!r}")
    kind, rest = m.group(1), m.group(2).strip()
    if kind == "skip":
        reason = rest.strip("() ")
        assert reason, f"README.md:{line}: a skipped block must say why"
        return reason, ()
    rest = rest.split(" -- ")[0]  # what follows " -- " is commentary
    pairs = []
    for part in rest.split(" | "):
        old, sep, new = part.partition(" -> ")
        assert sep and old.strip(), f"README.md:{line}: expected 'OLD -> NEW', got {part!r}"
        pairs.append((old.strip(), new.strip()))
    return None, tuple(pairs)


def parse_readme(text: str) -> List[Block]:
    """The fenced code blocks of ``text`` with their ``readme-test`` directives."""
    lines = text.splitlines()
    blocks: List[Block] = []
    part = 1
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            if lines[i].strip() == SECOND_PART:
                part = 2
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not re.match(r"^```\s*$", lines[j]):
            j += 1
        assert j < len(lines), f"README.md:{start + 1}: unclosed code fence"
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        skip, subs = (None, ())
        if k >= 0 and lines[k].lstrip().startswith("<!--") and "readme-test" in lines[k]:
            skip, subs = _parse_directive(lines[k], k + 1)
        blocks.append(Block(m.group(1), "\n".join(lines[start + 1:j]) + "\n", start + 1, part, skip, subs))
        i = j + 1
    return blocks


def substitute(block: Block) -> str:
    code = block.code
    for old, new in block.substitutions:
        assert old in code, f"{block.label()}: substitution {old!r} does not occur in the block"
        code = code.replace(old, new)
    for pattern, new in GLOBAL_SUBSTITUTIONS:
        code = re.sub(pattern, new, code)
    return code


def _sources(work: pathlib.Path) -> None:
    """Tiny stand-ins, under the README's names, for the files its conversion examples read."""
    import torch
    import transformers
    from tests.helpers import write_segmentor

    shutil.copy(FIXTURES / "dinov2_tiny_reg4.pth", work / "dinov2_vitb14_reg4_pretrain.pth")
    shutil.copy(FIXTURES / "dinov2_tiny_reg4.json", work / "dinov2_tiny_hub.json")
    shutil.copy(FIXTURES / "seed_adapter_tiny.json", work / "adapter_b.json")
    adapter = torch.load(FIXTURES / "seed_adapter_tiny.pth", weights_only=True)
    (work / "work_dirs").mkdir()
    torch.save({"meta": {"epoch": 24}, "state_dict": {f"img_backbone.{k}": v for k, v in adapter.items()}},
               work / "work_dirs" / "epoch_24.pth")
    hf = transformers.Dinov2Config(hidden_size=96, num_hidden_layers=2, num_attention_heads=3,
                                   intermediate_size=384, image_size=56, patch_size=14)
    torch.manual_seed(0)
    transformers.Dinov2Model(hf).save_pretrained(work / "facebook-dinov2-base")
    # DINOv3: the tiny fixture trunk (Meta hub format) and segmentor checkpoint.
    shutil.copy(FIXTURES / "dinov3_tiny_mlp.pth", work / "dinov3_vitl16_pretrain_lvd1689m.pth")
    write_segmentor(work / "segmentor.pth")
    # The memory example runs the repository's benchmark script (read-only without --out).
    (work / "benchmarks").symlink_to(ROOT / "benchmarks")


def _env(work: pathlib.Path, cache: pathlib.Path) -> dict:
    env = dict(os.environ, HOME=str(work / "home"), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)
    # The jax-adapter command of the interpreter running the tests.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def _run_bash(block: Block, code: str, work: pathlib.Path, env: dict) -> None:
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=work, env=env,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert proc.returncode == 0, (
        f"{block.label()} failed (exit {proc.returncode}):\n{code}\n--- stdout\n{proc.stdout[-3000:]}"
        f"\n--- stderr\n{proc.stderr[-3000:]}")


def _run_python(block: Block, code: str, namespace: dict) -> None:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, block.label(), "exec"), namespace)
    except Exception as e:
        raise AssertionError(f"{block.label()} failed: {type(e).__name__}: {e}\n{code}\n--- stdout\n"
                             f"{out.getvalue()[-3000:]}") from e


def run_part(part: int, tmp_path: pathlib.Path, at_least: int) -> Tuple[pathlib.Path, dict]:
    """Run the part's blocks in order in a fresh scratch directory (at least ``at_least`` of them
    run); returns it and the namespace its python blocks shared."""
    blocks = [b for b in parse_readme(README.read_text()) if b.part == part]
    work = tmp_path / "clone"
    (work / "home").mkdir(parents=True)
    _sources(work)
    env = _env(work, tmp_path / "jax_cache")
    namespace: dict = {"__name__": "__readme__"}
    ran, skipped = [], []
    old_cwd = os.getcwd()
    os.chdir(work)
    try:
        for block in blocks:
            if block.lang not in RUN_LANGS:
                continue
            if block.skip:
                skipped.append(f"{block.label()}: {block.skip}")
                continue
            code = substitute(block)
            t0 = time.perf_counter()
            if block.lang == "bash":
                _run_bash(block, code, work, env)
            else:
                _run_python(block, code, namespace)
            ran.append(f"{block.label()} {time.perf_counter() - t0:.1f}s")
    finally:
        os.chdir(old_cwd)
        print("ran:", *ran, "not run:", *skipped, sep="\n  ")
    assert len(ran) >= at_least, ran
    return work, namespace
