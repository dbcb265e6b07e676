"""accelerate's offload hooks with the GPU kernels (CUDA only; the CPU side is in test_diffusers_conformance.py).

Kept free of peft/transformers imports so that a bare GPU machine (torch + diffusers + accelerate) runs it.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTPipeline, DPMSolverMultistepScheduler

from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule
from compressdit.zoo.train_dits import noise_scheduler_config
from tests.conftest import tiny_dit, tiny_vae
from tests.io.test_diffusers_quantizer import _quantize

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SPECS = {"int-w8a8": LinearQuantSpec(w_bits=8, a_bits=8), "int-w4-g64": LinearQuantSpec(w_bits=4, group_size=64)}


@pytest.mark.parametrize("fmt", list(SPECS))
def test_pipeline_sequential_and_model_cpu_offload_on_cuda(fmt, tmp_path):
    """Weights come to the GPU per call under the hooks (the kernels prepack again); images equal the on-GPU run."""
    from diffusers import DiTTransformer2DModel

    rules = [LayerRule("role:embedder", None), LayerRule("role:head", None), LayerRule("re:.*", SPECS[fmt])]
    _quantize(tiny_dit(), rules).save_pretrained(tmp_path / "model")

    def pipeline():
        return DiTPipeline(transformer=DiTTransformer2DModel.from_pretrained(tmp_path / "model"), vae=tiny_vae(),
                           scheduler=DPMSolverMultistepScheduler(**noise_scheduler_config()))

    def generate(pipe):
        return pipe(class_labels=[1, 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    expected = generate(pipeline().to("cuda"))
    for enable in ("enable_sequential_cpu_offload", "enable_model_cpu_offload"):
        pipe = pipeline()
        getattr(pipe, enable)()
        assert abs(generate(pipe) - expected).max() < 1e-3, enable
