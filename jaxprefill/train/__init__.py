"""Training: `jaxprefill train --config configs/train/<recipe>.yaml [key=value ...]` or

    from jaxprefill.train import TrainConfig, Trainer, train
    result = train(TrainConfig.load("configs/train/tiny-cpu.yaml", ["steps=20"]))

See docs/training.md.
"""

from jaxprefill.train.config import TrainConfig
from jaxprefill.train.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train"]
