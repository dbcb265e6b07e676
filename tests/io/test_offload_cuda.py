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


@pytest.mark.parametrize("fmt", list(SPECS))
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_onto_cuda(fmt, offload_type, tmp_path):
    """diffusers' group offloading (CPU-resident groups moved onto the GPU per forward, on a side stream at leaf
    level): the GPU kernels prepack the arriving weights; outputs equal the model living on the GPU."""
    from diffusers import FluxTransformer2DModel

    from tests.conftest import tiny_flux

    rules = [LayerRule("role:embedder", None), LayerRule("role:head", None), LayerRule("re:.*", SPECS[fmt])]
    _quantize(tiny_flux(2, 2, 4, 64, 64), rules).save_pretrained(tmp_path / "flux")
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 16, 16, generator=gen), encoder_hidden_states=torch.randn(2, 5, 64),
                  pooled_projections=torch.randn(2, 64), timestep=torch.tensor([0.3, 0.8]), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(5, 3), guidance=torch.ones(2), return_dict=False)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        expected = FluxTransformer2DModel.from_pretrained(tmp_path / "flux").cuda()(**inputs)[0]
        model = FluxTransformer2DModel.from_pretrained(tmp_path / "flux")
        per_group = {"num_blocks_per_group": 1} if offload_type == "block_level" else {"use_stream": True}
        model.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                   offload_type=offload_type, **per_group)
        for _ in range(2):  # the second call reuses the groups' pinned copies
            assert (model(**inputs)[0] - expected).abs().max().item() < 1e-3
