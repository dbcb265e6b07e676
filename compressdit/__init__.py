"""compressdit: post-training compression for Diffusion Transformers, loadable by stock diffusers."""

import logging as _logging


class _QuietImport:
    """Silence the import-time warnings of optional backends that diffusers imports and we never call
    (bitsandbytes' CPU ``gemm_4bit_forward`` fetched from the hub by ``kernels``, unreachable offline; torchao's
    CUDA-only extensions on a CPU build and its pytree deprecation notes), so a CLI error stays one line; the
    loggers' levels are restored on exit."""

    def __init__(self, *names: str) -> None:
        self.loggers = [_logging.getLogger(name) for name in names]

    def __enter__(self) -> None:
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.setLevel(_logging.ERROR)

    def __exit__(self, *exc) -> None:
        for logger, level in zip(self.loggers, self.levels):
            logger.setLevel(level)


with _QuietImport("bitsandbytes.backends.cpu.ops", "kernels", "torchao", "torch.utils._pytree",
                  "diffusers.quantizers.torchao.torchao_quantizer"):
    from compressdit.io.diffusers_quantizer import CompressditConfig, register_with_diffusers
    from compressdit.quant.layers import logical_weight_shapes

__version__ = "0.1.0"
__all__ = ["CompressditConfig", "__version__", "logical_weight_shapes", "recipe_config"]


def recipe_config(recipe: str, modules_to_not_convert: list[str] | None = None) -> CompressditConfig:
    """The ``quantization_config`` that quantizes a float checkpoint as diffusers loads it, as the data-free recipe
    ``recipe`` (``rtn-w8a8``, ``rtn-w4a16``, ``nvfp4``, ``fp8``, ... or a YAML path) does, leaving float the modules
    with a ``modules_to_not_convert`` entry in their name: see :func:`compressdit.recipe.recipe_config`."""
    from compressdit.recipe import recipe_config as from_recipe  # its stage registry costs ~1 s: loaded when used

    return from_recipe(recipe, modules_to_not_convert)

register_with_diffusers()
