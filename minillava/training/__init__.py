"""Training LLaVA in two stages: the recipes (`config`), the data (`data`), the feature cache (`cache`), the loop
(`loop`) and resumable state (`resume`)."""

from .cache import FeatureCache
from .config import LORA_LR, PARTS, RECIPES, Recipe, TrainConfig, apply_recipe
from .data import collate, encode_all, epoch_order, grouped_order
from .loop import TrainResult, initial_model, setup, train, train_step

__all__ = ["FeatureCache", "LORA_LR", "PARTS", "RECIPES", "Recipe", "TrainConfig", "TrainResult", "apply_recipe",
           "collate", "encode_all", "epoch_order", "grouped_order", "initial_model", "setup", "train", "train_step"]
