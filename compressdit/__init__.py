"""compressdit: post-training compression for Diffusion Transformers, loadable by stock diffusers."""

import logging as _logging


class _QuietImport:
    """Silence one library's import-time warnings about optional kernels we never call (bitsandbytes' CPU
    ``gemm_4bit_forward`` from the hub, unreachable offline), so a CLI error stays one line; restores the level."""

    def __init__(self, name: str) -> None:
        self.logger = _logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(_logging.ERROR)

    def __exit__(self, *exc) -> None:
        self.logger.setLevel(self.level)


with _QuietImport("bitsandbytes.backends.cpu.ops"):
    from compressdit.io.diffusers_quantizer import CompressditConfig, register_with_diffusers

__version__ = "0.1.0"
__all__ = ["CompressditConfig", "__version__"]

register_with_diffusers()
