"""Training-free Mixture of Blocks on zoo:dit-fmnist: relative MSE (sum of squared error / sum of squared reference)
of the prediction to the dense model on 4 x 64 held-out noised Fashion-MNIST latents (seed 123, random timesteps),
for the fitted per-sample routers and for the same routers with their weights zeroed (every sample runs the blocks
of highest mean importance: a static depth pruning); calibration 4 x 64 samples (seed 0). No distillation.

    PYTHONPATH=$PWD python bench/mob_init_compare.py
"""
import copy
import json
import time
from pathlib import Path

import torch

from compressdit.io.sources import load_source
from compressdit.models import adapter_for
from compressdit.moe.blocks import activated_parameters, group_routers
from compressdit.moe.mob import MoBConfig, mixture_of_blocks
from compressdit.stages import PipelineState
from compressdit.stages.prune_width import PruneWidthConfig, calibration_batches

torch.manual_seed(0)
torch.set_num_threads(2)
src = load_source("zoo:dit-fmnist")
adapter = adapter_for(src.transformer)
dense = src.transformer.eval()


def state(model):
    return PipelineState(source=src, adapter=adapter, model=model, workdir=Path("/tmp"),
                         reference_spec="zoo:dit-fmnist", quiet=True)


held = list(calibration_batches(state(dense), PruneWidthConfig(ffn_ratio=0.5, batches=4, batch_size=64, seed=123)))
with torch.no_grad():
    ref = [adapter.predict(dense, b.latents, b.timestep, b.cond) for b in held]


@torch.no_grad()
def rel_mse(model):
    num = den = 0.0
    for b, r in zip(held, ref):
        p = adapter.predict(model, b.latents, b.timestep, b.cond)
        num += (p - r).pow(2).sum().item()
        den += r.pow(2).sum().item()
    return num / den


rows = {}
for group, active in ((4, 2), (2, 1)):
    t0 = time.perf_counter()
    m = copy.deepcopy(dense)
    c = MoBConfig(group=group, active=active, batches=4, batch_size=64)
    mixture_of_blocks(m, adapter, c, calibration_batches(state(m), c, "mob"))
    routed = rel_mse(m)
    for block in group_routers(m).values():
        block.mob_router.weight.data.zero_()
    rows[f"mob {active}/{group}"] = {"activated": activated_parameters(m), "total": sum(p.numel() for p in m.parameters()),
                                     "rel_mse_routed": routed, "rel_mse_static": rel_mse(m),
                                     "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({f"mob {active}/{group}": rows[f"mob {active}/{group}"]}), flush=True)
