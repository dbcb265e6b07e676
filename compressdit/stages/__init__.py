"""Pipeline stages: one typed config + one registered handler each."""

from compressdit.stages.base import STAGES, PipelineState, Stage
# register the stages
from compressdit.stages import calibrate, quantize, distill, prune, prune_width, moe, mob, evaluate  # noqa: F401,E402

__all__ = ["STAGES", "PipelineState", "Stage"]
