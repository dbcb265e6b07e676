"""Training-free Dense2MoE vs Taylor width pruning of the FFNs on zoo:dit-fmnist at the same activated parameters:

relative MSE (sum of squared error / sum of squared reference) of the prediction to the dense model on 4 x 64 held-out
noised Fashion-MNIST latents (seed 123, random timesteps), overall and per tenth of the timestep range; calibration
4 x 64 samples (seed 0) for both. No distillation. Writes /tmp/moe-runs/init_compare.json.

    PYTHONPATH=$PWD python bench/moe_init_compare.py
"""
import copy, json, time
import torch
from compressdit.io.sources import load_source
from compressdit.models import adapter_for
from compressdit.stages import PipelineState
from compressdit.stages.prune_width import PruneWidthConfig, calibration_batches
from compressdit.moe.dense2moe import Dense2MoEConfig, dense2moe
from compressdit.moe.layers import activated_parameters
from compressdit.prune.width import prune_width
from pathlib import Path
torch.manual_seed(0)
torch.set_num_threads(2)
src = load_source("zoo:dit-fmnist")
adapter = adapter_for(src.transformer)
def state(model):
    return PipelineState(source=src, adapter=adapter, model=model, workdir=Path("/tmp"), reference_spec="zoo:dit-fmnist", quiet=True)
dense = src.transformer.eval()
held = list(calibration_batches(state(dense), PruneWidthConfig(ffn_ratio=0.5, batches=4, batch_size=64, seed=123)))
with torch.no_grad():
    ref = [adapter.predict(dense, b.latents, b.timestep, b.cond) for b in held]
def rel_mse(model):
    num = den = 0.0
    bins = torch.zeros(10); counts = torch.zeros(10)
    with torch.no_grad():
        for b, r in zip(held, ref):
            p = adapter.predict(model, b.latents, b.timestep, b.cond)
            err = (p - r).pow(2).flatten(1).mean(1); nrm = r.pow(2).flatten(1).mean(1)
            num += err.sum().item(); den += nrm.sum().item()
            k = (b.timestep.float() / 100).long().clamp(0, 9)
            bins.index_add_(0, k, err / nrm); counts.index_add_(0, k, torch.ones_like(err))
    return num / den, (bins / counts.clamp_min(1)).tolist()
total = lambda m: sum(p.numel() for p in m.parameters())
rows = {"dense": {"total": total(dense), "activated": total(dense), "rel_mse": 0.0}}
for name, kind, cfg in [("moe-50 taylor", "moe", dict(experts=7, shared_experts=1, top_k=3, grouping="taylor")),
                        ("moe-50 coactivation", "moe", dict(experts=7, shared_experts=1, top_k=3, grouping="coactivation")),
                        ("moe-50 no shared (8 experts, top-4)", "moe", dict(experts=8, shared_experts=0, top_k=4, grouping="taylor")),
                        ("width-50 taylor", "width", dict(ffn_ratio=0.5)),
                        ("moe-62 taylor", "moe", dict(experts=7, shared_experts=1, top_k=2, grouping="taylor")),
                        ("width-62 taylor", "width", dict(ffn_ratio=0.625))]:
    t0 = time.perf_counter()
    m = copy.deepcopy(dense)
    if kind == "moe":
        c = Dense2MoEConfig(batches=4, batch_size=64, **cfg)
        dense2moe(m, adapter, c, calibration_batches(state(m), c, "moe"))
    else:
        c = PruneWidthConfig(head_ratio=0.0, importance="taylor", batches=4, batch_size=64, roles=["ffn_up"], **cfg)
        prune_width(m, adapter, c, calibration_batches=calibration_batches(state(m), c))
    err, per_bin = rel_mse(m)
    rows[name] = {"total": total(m), "activated": activated_parameters(m), "rel_mse": err,
                  "rel_mse_per_timestep_bin": per_bin, "seconds": round(time.perf_counter() - t0, 1)}
    print(name, json.dumps(rows[name]), flush=True)
Path("/tmp/moe-runs/init_compare.json").write_text(json.dumps(rows, indent=1))
