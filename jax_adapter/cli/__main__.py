"""``python -m jax_adapter.cli``: the same as the ``jax-adapter`` command."""

import sys

from jax_adapter.cli import main

sys.exit(main())
