"""Hydra-composed image-classification framework on MindSpore, tracked in MLflow.

Importing it sets one default for MindSpore's logging (below) and nothing else: the entry point (``run.py``)
registers the config resolvers (``framework.tasks.register_resolvers``).
"""

import os

# Before MindSpore is imported (it reads this once): its graph compiler's warnings (submodule PIPELINE) are not
# shown, because it warns "Be aware of correctness risks" for every graph hardware.compile_cache reuses, a cache
# keyed to one program here (framework/launch/compile_cache.py). Errors still show; a user's own setting wins.
os.environ.setdefault("MS_SUBMODULE_LOG_v", "{PIPELINE:3}")
