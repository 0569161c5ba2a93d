"""The programs a plan compiles, built from abstract models (no weights are computed), and what
the compiler says about each: memory, time, code size, FLOPs, kernels.

``forward``: the adapter alone in eval mode, ``images [B, H, W, 3]`` float32 -> its four feature
maps. ``train``: the step ``jax-adapter train`` runs (the adapter under a small dense head,
AdamW with layer-wise decay, the batch split over a 1-D mesh of the devices, the state donated).
"""

from __future__ import annotations

import re
import time
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_adapter import compilation
from jax_adapter.errors import DependencyError
from jax_adapter.nn.attention import AttentionFallbackWarning
from jax_adapter.plan.census import census

PROGRAMS = ("forward", "train")
# XLA:GPU picks Triton GEMM tilings by autotuning on the device; without one some of the step's
# dots find no tiling ("Couldn't find output tile sizes"), so plans compile GEMMs to cuBLAS.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# libtpu refuses programs that do not fit, in one of two messages: "Ran out of memory in memory
# space hbm. Used 20.51G of 15.75G hbm. ..." or "Ran out of memory on HBM, the total memory
# required for HLO temporaries (16.94G) exceeds available HBM (15.75G)."
_TPU_OOM = (
    (re.compile(r"Ran out of memory in memory space hbm\. Used ([\d.]+)([KMGT])? of"), "peak"),
    (re.compile(r"Ran out of memory on HBM, the total memory required for HLO temporaries "
                r"\(([\d.]+)([KMGT])?\)"), "temporaries"),
)


def _forward(cfg: Any, devices: Sequence[Any], batch: int, size: Tuple[int, int]):
    """(lowered, None) of the adapter's forward, batch split over ``devices``."""
    from jax_adapter import registry
    from jax_adapter.models.build import abstract_model
    from jax_adapter.training import make_mesh

    mesh = make_mesh(devices)
    model = abstract_model(registry.kind_of_config(cfg).name, cfg)
    model.eval()
    graph, state = nnx.split(model)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state)
    images = jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32, sharding=split)

    @jax.jit
    def forward(state, images):
        return nnx.merge(graph, state)(images)

    with jax.set_mesh(mesh):  # Pallas TPU lowerings read the device kind of the mesh in context
        return forward.lower(state, images)


def _train(cfg: Any, devices: Sequence[Any], batch: int, size: Tuple[int, int], freeze_trunk: bool):
    """The lowered train step of ``jax-adapter train``."""
    from jax_adapter import training
    from jax_adapter.training import synthetic

    model = nnx.eval_shape(lambda: synthetic.SegmentationModel(cfg, rngs=nnx.Rngs(0)))
    model.train()
    step = training.adapter_step(model, synthetic.segmentation_loss, training.OptimizerConfig(),
                                 freeze_trunk=freeze_trunk, mesh=training.make_mesh(devices))
    data = {
        "images": jax.ShapeDtypeStruct((batch, *size, 3), jnp.float32, sharding=step.batch_sharding),
        "masks": jax.ShapeDtypeStruct((batch, *size), jnp.int32, sharding=step.batch_sharding),
    }
    return step.lower(step.abstract_state(), data)


def _bytes(value: str, unit: Optional[str]) -> int:
    return int(float(value) * _UNITS.get(unit or "", 1))


def out_of_memory(message: str) -> Optional[Dict[str, Any]]:
    """The memory record of libtpu's refusal to compile a program that does not fit, or None
    for any other error. The refusal names the peak, or the temporaries alone (the peak is then
    at least that)."""
    for pattern, what in _TPU_OOM:
        m = pattern.search(message)
        if m:
            size = _bytes(m.group(1), m.group(2))
            return {"peak": size, "temporaries": size if what == "temporaries" else None,
                    "reported_by": f"libtpu's refusal ({what})"}
    return None


def _memory(compiled: Any) -> Dict[str, Optional[int]]:
    ma = compiled.memory_analysis()
    get = lambda name: int(getattr(ma, name, 0) or 0)  # noqa: E731
    args, out, alias, temp = (get(f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp"))
    # TPUs report the heap simulation's peak (temp alone can read 0); deviceless GPU programs
    # report it as arguments + outputs - aliased + temporaries.
    peak = get("peak_memory_in_bytes") or args + out - alias + temp
    code = get("generated_code_size_in_bytes")
    return {"arguments": args, "outputs": out, "aliased": alias, "temporaries": temp, "peak": peak,
            "generated_code": code or None}


def _cost(lowered: Any, compiled: Any) -> Dict[str, Any]:
    """FLOPs, transcendentals and bytes accessed as XLA's cost analysis counts them."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    source = "optimised program"
    if not ca:
        # Deviceless GPU executables report none: run XLA's HloCostAnalysis through the CPU
        # client on the program before optimisation (custom calls, i.e. Pallas and cuDNN
        # kernels, count 0; bytes are before fusion).
        try:
            from jax._src.lib import xla_client

            module = lowered.compiler_ir("hlo").get_hlo_module()
            ca = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
            source = "program before optimisation (custom calls count 0)"
        except Exception:  # noqa: BLE001 - a private API; the plan stands without it
            return {"source": None}
    out: Dict[str, Any] = {"source": source}
    for key in ("flops", "transcendentals", "bytes accessed"):
        if ca and key in ca:
            out[key.replace(" ", "_")] = float(ca[key])
    return out


def _dependency_check(caught: Sequence[warnings.WarningMessage], platform: str) -> list:
    """Raise for a cuDNN the GPU would have but this process lacks; return other warnings."""
    texts = []
    for w in caught:
        text = " ".join(str(w.message).split())
        if (platform == "gpu" and issubclass(w.category, AttentionFallbackWarning)
                and re.search(r"cuDNN.*(not found|version|load)", text, re.I)):
            raise DependencyError(
                f"cuDNN is not installed here, so the trunk attention would not compile as on a GPU "
                f"({text[:200]}): pip install 'jax-adapter[plan-gpu]'")
        if text not in texts:
            texts.append(text)
    return texts


def compile_program(program: str, cfg: Any, devices: Sequence[Any], *, batch: int, image_size: Tuple[int, int],
                    freeze_trunk: bool) -> Dict[str, Any]:
    """Lower and compile ``program`` for ``devices`` (compile-only devices of one platform) and
    read what the compiler decided."""
    builders: Dict[str, Callable[[], Any]] = {
        "forward": lambda: _forward(cfg, devices, batch, image_size),
        "train": lambda: _train(cfg, devices, batch, image_size, freeze_trunk),
    }
    jax.clear_caches()  # every trace must run again under this target
    with compilation.target(devices=devices) as t, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        lowered = builders[program]()
        lower_s = time.perf_counter() - t0
    notes = _dependency_check(caught, t.platform)
    record: Dict[str, Any] = {"lower_s": round(lower_s, 2), "dispatch": {k: dict(v) for k, v in t.decisions.items()},
                              "warnings": notes}
    options = GPU_COMPILER_OPTIONS if t.platform == "gpu" else None
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception as e:  # noqa: BLE001 - only libtpu's out-of-memory refusal is a result
        memory = out_of_memory(str(e))
        if memory is None:
            raise
        record.update(compile_s=round(time.perf_counter() - t0, 2), error=" ".join(str(e).split())[:300],
                      memory=memory)
        return record
    record["compile_s"] = round(time.perf_counter() - t0, 2)
    record["memory"] = _memory(compiled)
    record["cost"] = _cost(lowered, compiled)
    record["kernels"] = census(compiled.as_text())
    return record
