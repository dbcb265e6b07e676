"""Knowledge distillation of compressed students from their uncompressed teachers."""

from compressdit.distill.data import DistillData, fmnist_data
from compressdit.distill.losses import (capture_features, data_loss, feature_loss, massive_activation_mask,
                                        output_loss, resolve_layer_map)
from compressdit.distill.objectives import OBJECTIVES, objective_for
from compressdit.distill.trainer import DistillConfig, check_pair, distill

__all__ = ["DistillConfig", "DistillData", "OBJECTIVES", "capture_features", "check_pair", "data_loss", "distill",
           "feature_loss", "fmnist_data", "massive_activation_mask", "objective_for", "output_loss",
           "resolve_layer_map"]
