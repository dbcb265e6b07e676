"""compressdit: post-training compression for Diffusion Transformers, loadable by stock diffusers."""

from compressdit.io.diffusers_quantizer import CompressditConfig, register_with_diffusers

__version__ = "0.1.0"
__all__ = ["CompressditConfig", "__version__"]

register_with_diffusers()
