"""lit_zpd: teach small language models at the frontier of their competence."""

from lit_zpd.module import DistillModule, LoraSettings, LossConfig
from lit_zpd.rollout.datamodule import RolloutDataModule
from lit_zpd.rollout.engine import SamplingConfig

__all__ = ["DistillModule", "LoraSettings", "LossConfig", "RolloutDataModule", "SamplingConfig"]
__version__ = "0.1.0"
