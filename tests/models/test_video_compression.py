"""Calibrated ``w8a8`` / ``w4a8`` (the shipped recipes, tiny sizes) on tiny CogVideoX, Wan and Latte through
the Python API with synthetic text conditions -> save -> stock ``from_pretrained`` reload -> equal outputs."""

from __future__ import annotations

import json

import pytest
import torch

from compressdit.calibration.stats import capture_input_absmax, stats_from_recorder
from compressdit.io.sources import load_source
from compressdit.models.sampling import sample
from compressdit.models.text_conditions import synthetic_text
from compressdit.pipeline import save_checkpoint
from compressdit.quant.layers import QuantizedLinear
from compressdit.recipe import load_recipe
from compressdit.stages import STAGES, PipelineState
from tests.models.test_video_adapters import TEXT_DIM, TEXT_SEQ, _adapter, _model

STEPS = 2


def _calibrate(state: PipelineState, conditions: list, steps: int):
    """What the calibrate stage records, on conditions given here (its sets hold prompt strings)."""
    names = list(state.adapter.linear_layers(state.model))
    with capture_input_absmax(state.model, names) as recorder:
        timesteps: list[int] = []

        def on_step(i, t, latents, prediction):
            timesteps.append(int(t))
            recorder.step = i + 1 if i + 1 < steps else 0

        sample(state.adapter, state.model, conditions, state.adapter.scheduler(state.model), steps=steps,
               guidance=3.0, seed=1, on_step=on_step)
    return stats_from_recorder(recorder, timesteps)


def _compress(family: str, recipe_name: str, tmp_path) -> PipelineState:
    folder = tmp_path / family
    _model(family).save_pretrained(folder)
    source = load_source(str(folder))
    state = PipelineState(source=source, adapter=_adapter(family), model=source.transformer,
                          workdir=tmp_path / "out", reference_spec=str(folder), quiet=True)
    recipe = load_recipe(recipe_name)
    conditions = synthetic_text(2, TEXT_SEQ, TEXT_DIM, seed=1)
    for stage in recipe.stages:
        if stage.name == "calibrate":
            state.calibration_conditions = conditions
            state.calibration = _calibrate(state, conditions, STEPS)
            stage.config.steps, stage.config.guidance, stage.config.seed = STEPS, 3.0, 1
            state.calibration_config = stage.config  # the loop GPTQ's Hessian pass replays (w4a8)
        elif stage.name == "quantize":
            mixed = getattr(stage.config.options, "mixed_precision", None)
            if mixed is not None:
                # tiny widths: the fp32 row scales alone fill a 4.5-bit stored budget, so count code bits
                mixed.probe_samples, mixed.probe_steps, mixed.budget = 2, STEPS, "codes"
            STAGES.get("quantize").run(state, stage.config)
    state.workdir.mkdir()
    save_checkpoint(state, recipe)  # includes the reload check on synthetic conditions
    return state


@pytest.mark.parametrize("recipe_name", ["w8a8", "w4a8"])
@pytest.mark.parametrize("family", ["cogvideox", "wan", "latte"])
def test_calibrated_recipe_save_stock_reload_equal_outputs(family: str, recipe_name: str, tmp_path) -> None:
    import diffusers

    state = _compress(family, recipe_name, tmp_path)
    model = state.model
    assert state.calibration is not None and state.quant_specs
    assert any(n.startswith("stock diffusers reload check: max |output difference|") for n in state.notes)
    specs = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["modules"]
    assert set(specs) == set(state.quant_specs)
    adapter = state.adapter
    roles = {adapter.role_of(name) for name in specs}
    assert not roles & {"embedder", "head"} and {"attn_qkv", "ffn_up", "ffn_down", "adaln"} <= roles
    if recipe_name == "w4a8":  # mixed precision promoted some layers to W8 under the 4.5-bit budget
        assert {s["w_bits"] for s in specs.values()} == {4, 8}
        assert any("mixed precision: average weight bits" in n for n in state.notes)
        (table,) = [t for t in state.tables if t["title"].startswith("mixed-precision sensitivity")]
        groups = {row[0]: row[1] for row in table["rows"]}
        assert {g for n, g in groups.items() if adapter.role_of(n) == "temporal"} <= {"temporal"}
        assert ("temporal" in groups.values()) == (family == "latte")  # only Latte has temporal attention
    reloaded = getattr(diffusers, type(model).__name__).from_pretrained(tmp_path / "out").eval()
    latents = torch.randn(2, *adapter.latent_shape(model), generator=torch.Generator().manual_seed(7))
    cond = adapter.encode(model, synthetic_text(2, TEXT_SEQ, TEXT_DIM, seed=8))
    with torch.no_grad():
        ours = adapter.predict(model, latents, torch.tensor([600]), cond)
        theirs = adapter.predict(reloaded, latents, torch.tensor([600]), cond)
    assert torch.isfinite(ours).all() and torch.equal(ours, theirs)


def test_wan_keep_in_fp32_modules_stay_unquantized_and_fp32(tmp_path) -> None:
    from diffusers import WanTransformer3DModel

    _compress("wan", "w8a8", tmp_path)
    reloaded = WanTransformer3DModel.from_pretrained(tmp_path / "out", torch_dtype=torch.bfloat16)
    keep = WanTransformer3DModel._keep_in_fp32_modules
    in_keep = {n: m for n, m in reloaded.named_modules() if any(k in n.split(".") for k in keep)}
    assert any(n.endswith("time_embedder.linear_1") for n in in_keep)
    assert not any(isinstance(m, QuantizedLinear) for m in in_keep.values())
    kept = [(n, p) for n, p in reloaded.named_parameters() if any(k in n.split(".") for k in keep)]
    assert kept and all(p.dtype == torch.float32 for _, p in kept)
    assert reloaded.blocks[0].attn1.to_q.__class__ is not torch.nn.Linear  # quantized ...
    assert reloaded.proj_out.weight.dtype == torch.bfloat16  # ... and the rest of the model in the asked dtype
