"""Relative MSE to the dense zoo:dit-fmnist of students rebuilt from distillation checkpoints (``state.pt`` of the
trainer), on the held-out set of bench/moe_init_compare.py (4 x 64 noised Fashion-MNIST latents, seed 123, random
timesteps), with total and activated parameters.

    PYTHONPATH=$PWD python bench/moe_distilled_mse.py NAME=STATE.pt[:TOP_K] ...
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe_bars import student_from_state  # noqa: E402

from compressdit.io.sources import load_source  # noqa: E402
from compressdit.models import adapter_for  # noqa: E402
from compressdit.moe.blocks import activated_parameters  # noqa: E402
from compressdit.stages import PipelineState  # noqa: E402
from compressdit.stages.prune_width import PruneWidthConfig, calibration_batches  # noqa: E402

torch.set_num_threads(2)
src = load_source("zoo:dit-fmnist")
adapter = adapter_for(src.transformer)
dense = src.transformer.eval()
state = PipelineState(source=src, adapter=adapter, model=dense, workdir=Path("/tmp"), reference_spec="zoo:dit-fmnist",
                      quiet=True)
held = list(calibration_batches(state, PruneWidthConfig(ffn_ratio=0.5, batches=4, batch_size=64, seed=123)))
with torch.no_grad():
    ref = [adapter.predict(dense, b.latents, b.timestep, b.cond) for b in held]
for arg in sys.argv[1:]:
    name, spec = arg.split("=", 1)
    path, _, k = spec.partition(":")
    model, step = student_from_state(src, path, int(k or 3))
    num = den = 0.0
    with torch.no_grad():
        for b, r in zip(held, ref):
            num += (adapter.predict(model, b.latents, b.timestep, b.cond) - r).pow(2).sum().item()
            den += r.pow(2).sum().item()
    print(json.dumps({name: {"step": step, "rel_mse": round(num / den, 4), "activated": activated_parameters(model),
                             "total": sum(p.numel() for p in model.parameters())}}), flush=True)
