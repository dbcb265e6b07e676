"""``compressdit quantize`` on bare transformer folders (no text encoder, no VAE, text widths that are not
MiniLM's 384): calibration-free recipes run, and the reload check uses synthetic conditions of the model's
shapes (families with an adapter) or compares the checkpoint tensor by tensor (generic adapter)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_cli_errors import offline_cli_environment, run_main

TEXT_DIM, POOLED_DIM = 48, 40


@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
    with offline_cli_environment(tmp_path_factory.mktemp("env")) as tmp:
        yield tmp


def _random(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


def _build(family: str):
    """Hidden widths of 64 (group-wise int4 in groups of 64 fits every quantized layer)."""
    import diffusers

    torch.manual_seed(0)
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=64,
            pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16)
    if family == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    if family == "pixart":
        return diffusers.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
            patch_size=2, cross_attention_dim=64, caption_channels=TEXT_DIM, use_additional_conditions=False)
    if family == "wan":
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=TEXT_DIM, freq_dim=32, ffn_dim=128, num_layers=1, rope_max_seq_len=32)
    if family == "cogvideox":
        return diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=64,
            text_embed_dim=TEXT_DIM, num_layers=1, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
            max_text_seq_length=6, use_rotary_positional_embeddings=True)
    if family == "latte":
        return diffusers.LatteTransformer3DModel(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=1,
            cross_attention_dim=64, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
            caption_channels=TEXT_DIM, video_length=2)
    from tests.models import tiny_families

    return tiny_families.FAMILIES[family]()[0]


CASES = [(f, r) for f in ("sd3", "flux", "pixart") for r in ("rtn-w8a8", "rtn-w4a16")] + \
        [("wan", "rtn-w8a8"), ("cogvideox", "rtn-w4a16"), ("latte", "rtn-w4a16"),
         ("Lumina2Transformer2DModel", "rtn-w8a8")]


@pytest.mark.parametrize("family, recipe", CASES, ids=[f"{f}-{r}" for f, r in CASES])
def test_bare_folder_quantizes_without_a_text_encoder_and_reloads(family: str, recipe: str, tmp_path) -> None:
    import diffusers

    from compressdit.models import adapter_for
    from compressdit.quant.layers import QuantizedLinear

    model = _random(_build(family))
    model.save_pretrained(tmp_path / "bare")
    out = tmp_path / "out"
    result = run_main("quantize", tmp_path / "bare", "--recipe", recipe, "--out", out, "--no-eval", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["quantized_modules"] > 0 and summary["recipe"] == recipe
    reloaded = getattr(diffusers, type(model).__name__).from_pretrained(out).eval()
    quantized = [n for n, m in reloaded.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == summary["quantized_modules"]
    adapter = adapter_for(model)
    cond = adapter.synthetic_conditioning(model, 2, seed=5)
    if cond is not None:  # a family adapter: the checkpoint runs and stays close to the float model
        latents = torch.randn(2, *adapter.latent_shape(model), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            ours = adapter.predict(reloaded, latents, torch.tensor([500]), cond)
            ref = adapter.predict(model, latents, torch.tensor([500]), cond)
        assert torch.isfinite(ours).all() and ours.shape == latents.shape
        assert 0 < (ours - ref).norm() / ref.norm() < 0.5


def test_video_pipeline_folder_with_its_own_vae_class_quantizes(tmp_path) -> None:
    """A Wan pipeline folder (``AutoencoderKLWan``, ``UniPCMultistepScheduler``, no text encoder saved)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    root = tmp_path / "wan-pipe"
    _random(_build("wan")).save_pretrained(root / "transformer")
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                     temperal_downsample=[False]).save_pretrained(root / "vae")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                            flow_shift=3.0).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    out = tmp_path / "out"
    result = run_main("quantize", root, "--recipe", "rtn-w8a8", "--out", out, "--no-eval", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["quantized_modules"] > 0
    assert json.loads((out / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKLWan"
    from compressdit.quant.layers import QuantizedLinear

    reloaded = WanTransformer3DModel.from_pretrained(out / "transformer")
    assert isinstance(reloaded.blocks[0].attn1.to_q, QuantizedLinear)


@pytest.mark.parametrize("family, recipe", [("flux", "rtn-w4a16"), ("pixart", "nvfp4")])
def test_the_cli_and_loading_with_recipe_config_write_the_same_codes(family: str, recipe: str, tmp_path) -> None:
    """``compressdit quantize MODEL --recipe R`` and ``from_pretrained(MODEL, quantization_config=recipe_config(R))``
    quantize the same layers to the same tensors, and save the float ones in the source's dtype (fp16 here, loaded
    in fp32): one tool, two doors."""
    import diffusers
    from safetensors.torch import load_file

    import compressdit

    model = _random(_build(family))
    model.to(torch.float16).save_pretrained(tmp_path / "bare")
    assert run_main("quantize", tmp_path / "bare", "--recipe", recipe, "--out", tmp_path / "cli", "--no-eval",
                    "--quiet").code == 0
    loaded = getattr(diffusers, type(model).__name__).from_pretrained(
        tmp_path / "bare", quantization_config=compressdit.recipe_config(recipe))
    loaded.save_pretrained(tmp_path / "loaded")
    cli_config = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    assert cli_config["modules"] == loaded.config.quantization_config.modules
    cli, ours = (load_file(tmp_path / name / "diffusion_pytorch_model.safetensors") for name in ("cli", "loaded"))
    assert cli.keys() == ours.keys()
    quantized = [k for k in cli if k.rpartition(".")[0] in cli_config["modules"]]
    assert quantized and all(torch.equal(cli[k], ours[k]) for k in quantized)
    assert all(cli[k].dtype == ours[k].dtype and torch.equal(cli[k], ours[k]) for k in cli), \
        {k: (cli[k].dtype, ours[k].dtype) for k in cli if cli[k].dtype != ours[k].dtype}
    assert any(t.dtype == torch.float16 for t in ours.values())
