"""Training LLaVA in two stages: the recipes (`config`), the data (`data`), the feature cache (`cache`), the loop
(`loop`) and resumable state (`resume`)."""

from .cache import CachedImages, FeatureCache
from .config import LORA_LR, PARTS, RECIPES, Recipe, TrainConfig, apply_recipe
from .data import LazyData, collate, encode_all, epoch_order, grouped_order
from .loop import Run, TrainResult, initial_model, setup, train, train_step

__all__ = ["CachedImages", "FeatureCache", "LazyData", "LORA_LR", "PARTS", "RECIPES", "Recipe", "Run", "TrainConfig",
           "TrainResult", "apply_recipe", "collate", "encode_all", "epoch_order", "grouped_order", "initial_model",
           "setup", "train", "train_step"]
