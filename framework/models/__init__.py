"""Model zoo: ``create_model(name, **kwargs)`` builds any registered family."""

from framework.models import conformer, efficientnet, nasnet, nfnet, resnext  # noqa: F401  (registers the families)
from framework.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
