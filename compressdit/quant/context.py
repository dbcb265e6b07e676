"""What a quantization method may use besides the model: adapter, calibration, a probe for sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compressdit.calibration.stats import ActivationStats
from compressdit.errors import CalibrationError
from compressdit.models.base import ModelAdapter
from compressdit.models.sampling import sample

if TYPE_CHECKING:
    from compressdit.models.prompt_encoders import PromptEncoder


@dataclass
class QuantContext:
    """Passed explicitly to every method handler; ``tables``/``notes``/``figures`` flow into the report."""

    adapter: ModelAdapter
    calibration: ActivationStats | None = None
    scheduler: Any = None
    conditions: list = field(default_factory=list)
    prompt_encoder: PromptEncoder | None = None  # the model's (None: prompts reach the adapter as strings)
    quiet: bool = False
    calibration_config: Any = None  # the calibrate stage's CalibrateConfig (steps, guidance, seed, batch_size)
    tables: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)

    def require_calibration(self, what: str) -> Any:
        """The calibrate stage's config, for steps that replay its sampling loop; ``what`` names the step in the
        error raised when the recipe has no calibrate stage (or it produced no conditions)."""
        if self.calibration_config is None or not self.conditions:
            raise CalibrationError(f"{what} needs calibration inputs: add a calibrate stage before quantize")
        return self.calibration_config

    def replay_calibration(self, model, what: str, batch_size: int | None = None) -> None:
        """Run the calibrate stage's sampling loop again on ``model`` (same conditions, steps, guidance and seed, so
        the same timesteps), for hooks the caller placed; ``what`` names the step in the error raised when the
        recipe has no calibrate stage. ``batch_size``: the step's own (default: the calibrate stage's)."""
        config = self.require_calibration(what)
        sample(self.adapter, model, self.conditions, self.scheduler, steps=config.steps, guidance=config.guidance,
               seed=config.seed, batch_size=batch_size or config.batch_size, prompt_encoder=self.prompt_encoder)

    def input_absmax(self, names) -> dict:
        if self.calibration is None:
            return {}
        return {n: self.calibration.channel_absmax(n) for n in names if n in self.calibration.absmax}
