"""Tiny random diffusers transformers of families without a compressdit adapter, with inputs for one forward.

Each builder returns ``(model, inputs)``: ``model(**inputs).sample`` runs in well under a second on CPU. The
hidden widths are multiples of 64 so group-wise int4 (groups of 64) fits every quantized layer (Mochi: 192, as
its SwiGLU width is 8/3 of it).
"""

from __future__ import annotations

import torch

B = 2  # batch


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _finish(model, scale: float = 0.05):
    """Non-zero weights everywhere (no zero-initialised gate or head hides a layer), uneven per-row scales."""
    with torch.no_grad():
        for p in model.parameters():
            rows = 1 + torch.rand(p.shape[0], *[1] * (p.dim() - 1)) * 3 if p.dim() else 1.0
            p.copy_(torch.randn_like(p) * scale * rows)
    return model.eval()


def lumina2():
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    model = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=2,
                                      num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=64,
                                      axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=64)
    inputs = {"hidden_states": _randn(B, 4, 8, 8), "timestep": torch.tensor([0.3, 0.7]),
              "encoder_hidden_states": _randn(B, 6, 64, seed=1),
              "encoder_attention_mask": torch.ones(B, 6, dtype=torch.bool)}
    return _finish(model), inputs


def auraflow():
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(0)
    model = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                       num_single_dit_layers=1, attention_head_dim=32, num_attention_heads=2,
                                       joint_attention_dim=64, caption_projection_dim=64, out_channels=4,
                                       pos_embed_max_size=64)
    inputs = {"hidden_states": _randn(B, 4, 8, 8), "encoder_hidden_states": _randn(B, 6, 64, seed=1),
              "timestep": torch.tensor([300.0, 700.0])}
    return _finish(model), inputs


def chroma():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    model = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                     axes_dims_rope=(4, 6, 6), approximator_num_channels=64,
                                     approximator_hidden_dim=64, approximator_layers=1)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    inputs = {"hidden_states": _randn(B, 16, 64), "encoder_hidden_states": _randn(B, 6, 64, seed=1),
              "timestep": torch.tensor([0.3, 0.7]), "img_ids": img_ids, "txt_ids": torch.zeros(6, 3)}
    return _finish(model), inputs


def cogview4():
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(0)
    model = CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                       attention_head_dim=32, num_attention_heads=2, text_embed_dim=64,
                                       time_embed_dim=64, condition_dim=16, pos_embed_max_size=16, sample_size=8,
                                       rope_axes_dim=(16, 16))
    size = torch.tensor([[64.0, 64.0]] * B)
    inputs = {"hidden_states": _randn(B, 4, 8, 8), "encoder_hidden_states": _randn(B, 6, 64, seed=1),
              "timestep": torch.tensor([300.0, 700.0]), "original_size": size, "target_size": size,
              "crop_coords": torch.zeros(B, 2)}
    return _finish(model), inputs


def mochi():
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=3, attention_head_dim=64, num_layers=2,
                                    pooled_projection_dim=192, in_channels=4, text_embed_dim=64, time_embed_dim=64,
                                    max_sequence_length=8)
    inputs = {"hidden_states": _randn(B, 4, 2, 8, 8), "encoder_hidden_states": _randn(B, 6, 64, seed=1),
              "timestep": torch.tensor([300.0, 700.0]), "encoder_attention_mask": torch.ones(B, 6, dtype=torch.bool)}
    return _finish(model), inputs


def sana():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=32,
                                   cross_attention_dim=64, caption_channels=64, mlp_ratio=2.0, sample_size=8,
                                   patch_size=2)
    inputs = {"hidden_states": _randn(B, 4, 8, 8), "encoder_hidden_states": _randn(B, 6, 64, seed=1),
              "timestep": torch.tensor([300.0, 700.0])}
    return _finish(model), inputs


def qwenimage():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                                        axes_dims_rope=(8, 12, 12))
    inputs = {"hidden_states": _randn(B, 16, 64), "encoder_hidden_states": _randn(B, 6, 64, seed=1),
              "encoder_hidden_states_mask": torch.ones(B, 6), "timestep": torch.tensor([0.3, 0.7]),
              "img_shapes": [(1, 4, 4)] * B}
    return _finish(model), inputs


def ltx_video():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(in_channels=64, out_channels=64, patch_size=1, patch_size_t=1,
                                       num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
                                       num_layers=1, caption_channels=64)
    inputs = {"hidden_states": _randn(B, 2 * 4 * 4, 64), "encoder_hidden_states": _randn(B, 6, 64, seed=1),
              "timestep": torch.tensor([300, 700]), "encoder_attention_mask": torch.ones(B, 6), "num_frames": 2,
              "height": 4, "width": 4}
    return _finish(model), inputs


FAMILIES = {"Lumina2Transformer2DModel": lumina2, "AuraFlowTransformer2DModel": auraflow,
            "ChromaTransformer2DModel": chroma, "CogView4Transformer2DModel": cogview4,
            "MochiTransformer3DModel": mochi, "SanaTransformer2DModel": sana,
            "QwenImageTransformer2DModel": qwenimage, "LTXVideoTransformer3DModel": ltx_video}
