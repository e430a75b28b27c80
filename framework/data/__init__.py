"""Datasets (``dataset/`` configs): each source exposes ``num_classes``, ``class_names`` and ``loader(split)``."""
