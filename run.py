"""Entry point: ``python run.py [task=train|eval] [group=choice ...] [key=value ...]``."""

import hydra
from omegaconf import DictConfig

import framework.tasks


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    framework.tasks.run(cfg)


if __name__ == "__main__":
    main()
