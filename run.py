"""Entry point: ``python run.py [-m] [task=train|eval|benchmark|compare] [group=choice ...] [key=value ...]``."""

from typing import Any

import hydra
from omegaconf import DictConfig

import framework.tasks

framework.tasks.register_resolvers()  # ${project_root:} and the others the configs use, before Hydra composes


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Any:
    return framework.tasks.run(cfg)  # a sweep (-m) reads the trial's objective from the return value


if __name__ == "__main__":
    framework.tasks.check_command_line()  # a mistyped group name gets a "did you mean" before Hydra composes
    main()
