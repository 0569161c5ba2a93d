"""The data-parallel mesh axis, shared by the layers that split work over it and by training."""

from __future__ import annotations

from typing import Optional

import jax

# Name of the device-mesh axis that splits the batch in data-parallel training.
BATCH_AXIS = "data"


def batch_axis_in_context() -> Optional[str]:
    """``BATCH_AXIS`` when the mesh set with ``jax.set_mesh`` splits the batch over it, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or BATCH_AXIS not in mesh.axis_names or mesh.shape[BATCH_AXIS] == 1:
        return None
    return BATCH_AXIS
