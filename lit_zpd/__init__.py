"""lit_zpd: teach small language models at the frontier of their competence."""

from lit_zpd.loss_config import LossConfig
from lit_zpd.module import DistillModule, LoraSettings
from lit_zpd.rollout.batch import EvalBatch, RolloutBatch
from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.datamodule import RolloutDataModule
from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.rollout.plan import RolloutHook

__all__ = [
    "DistillModule", "EvalBatch", "LoraSettings", "LossConfig", "RolloutBatch", "RolloutContext",
    "RolloutDataModule", "RolloutHook", "SamplingConfig",
]
__version__ = "0.1.0"
