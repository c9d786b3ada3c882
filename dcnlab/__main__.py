"""python -m dcnlab train|eval|visualize [Hydra overrides]"""

import os
import sys
from typing import NoReturn

import hydra
from omegaconf import DictConfig

USAGE = """usage: python -m dcnlab COMMAND [hydra overrides]

commands:
  train      train a model: python -m dcnlab train experiment=signals1d trainer.max_epochs=20
  eval       test a checkpoint: python -m dcnlab eval ckpt_path=outputs/train/.../checkpoints/last.ckpt
  visualize  draw where the deformable layers sample (PNGs in the run's visualize/ folder):
             python -m dcnlab visualize ckpt_path=outputs/train/.../checkpoints/last.ckpt samples=8

Overrides follow Hydra's syntax; `python -m dcnlab train --help` lists the config groups."""

CONFIG_PATH = "pkg://dcnlab.conf"


def _exit_on_bad_input(command: str, error: Exception) -> NoReturn:
    # Bad paths and arguments are the user's to fix: the message says what; a traceback would bury it.
    print(f"dcnlab {command}: {error}", file=sys.stderr)
    sys.exit(1)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(config: DictConfig) -> float | None:
    from dcnlab.runner import train

    try:
        metrics = train(config)
    except (FileNotFoundError, ValueError) as error:
        _exit_on_bad_input("train", error)
    # A number for Hydra sweepers that optimise the returned value.
    return metrics.get("test/accuracy", metrics.get("test/dice"))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _eval(config: DictConfig) -> None:
    from dcnlab.runner import evaluate

    try:
        evaluate(config)
    except (FileNotFoundError, ValueError) as error:
        _exit_on_bad_input("eval", error)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="visualize")
def _visualize(config: DictConfig) -> None:
    from dcnlab.visualize import visualize

    try:
        visualize(config)
    except (FileNotFoundError, ValueError) as error:
        _exit_on_bad_input("visualize", error)


COMMANDS = {"train": _train, "eval": _eval, "visualize": _visualize}


# Lightning's DDP launcher re-runs this module for each extra rank with the overrides alone;
# the command travels to those processes in the environment.
COMMAND_VARIABLE = "DCNLAB_COMMAND"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        os.environ[COMMAND_VARIABLE] = sys.argv.pop(1)
    elif os.environ.get(COMMAND_VARIABLE) not in COMMANDS or "LOCAL_RANK" not in os.environ:
        print(USAGE, file=sys.stderr)
        return 2
    COMMANDS[os.environ[COMMAND_VARIABLE]]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
