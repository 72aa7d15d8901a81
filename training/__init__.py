"""Training EVF-SAM2 models: ``train(config_path)`` runs a YAML recipe (see docs/training.md)."""

from evf.training.config import TrainConfig
from evf.training.tokenizer import build_tokenizer
from evf.training.trainer import train

__all__ = ["TrainConfig", "build_tokenizer", "train"]
