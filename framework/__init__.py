"""Hydra-composed image-classification framework on MindSpore, tracked in MLflow.

Importing it does nothing else: the entry point (``run.py``) registers the config resolvers
(``framework.tasks.register_resolvers``).
"""
