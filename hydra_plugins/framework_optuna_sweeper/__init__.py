"""This project's Optuna sweeper for Hydra (``hydra/sweeper=optuna``; configs in ``conf/hydra/sweeper/``)."""
