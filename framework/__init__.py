"""Hydra-composed image-classification framework on MindSpore, tracked in MLflow."""

import os

# MindSpore's checkpoint protobuf code needs the pure-Python protobuf backend (MindSpore sets this
# itself on import, but only if nothing imported protobuf first; MLflow does). Set it before either.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

from framework import paths  # noqa: E402, F401  (registers the ${project_root:} resolver used by conf/paths)
from framework.launch import slurm  # noqa: E402, F401  (registers the SLURM resolvers hardware/ and hydra/launcher/ use)
