"""The code MLflow runs to load a training run's model: "models from code", so that loading a model unpickles
nothing (``framework.tasks.pyfunc_model`` has the model; this file is copied into each logged model)."""

from mlflow.models import set_model

from framework.tasks.pyfunc_model import ImageClassifier

set_model(ImageClassifier())
