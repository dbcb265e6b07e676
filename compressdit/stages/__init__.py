"""Pipeline stages: one typed config + one registered handler each."""

from compressdit.stages.base import STAGES, PipelineState, Stage
from compressdit.stages import calibrate, quantize, distill, prune, evaluate  # noqa: F401,E402  (register the stages)

__all__ = ["STAGES", "PipelineState", "Stage"]
