"""Training: one generic trainer (`Trainer`) driven by a model-specific `TrainTask`,
typed configs loaded strictly from TOML/JSON, and atomic, exactly-resumable checkpoints."""

from kino.training.checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from kino.training.config import TrainConfig, config_from_dict, config_to_dict, load_config
from kino.training.trainer import EMA, Trainer, TrainResult, TrainTask, lr_factor

__all__ = [
    "EMA",
    "Checkpoint",
    "TrainConfig",
    "TrainResult",
    "TrainTask",
    "Trainer",
    "config_from_dict",
    "config_to_dict",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "lr_factor",
    "save_checkpoint",
]
