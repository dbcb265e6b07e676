"""Streaming quantization of a FLUX.1-size transformer (12B parameters, ~24 GB in bf16) on a machine with less memory.

A benchmark, not a test. Steps, each in its own process so that each has its own peak RSS (``VmHWM``, read by
the process itself at its end):

1. ``source``: ``FluxTransformer2DModel`` with FLUX.1-dev's config and random bf16 weights, written shard by
   shard (5 GB shards; never the whole model in memory).
2. ``quantize``: ``compressdit quantize SOURCE -r RECIPE --no-eval`` per recipe; it streams by itself because the
   model (48 GB once loaded in float32) exceeds the available memory. A recipe with a calibrate stage (``w8a8``,
   ``w4a16``) runs as a user recipe with a small calibration (``--calib-samples`` x ``--calib-steps``, guidance 4,
   one batch; FLUX's default 8x8 latent, i.e. 16 image tokens), prompts given as random T5/CLIP-width embeddings
   (``--embeddings``: the bare transformer folder has no text encoder) of ``--calib-tokens`` tokens; the calibration
   streams the blocks too, so the weights are read ``steps + 1`` times. ``w4a16`` rounds with GPTQ: that calibration
   also records every block call's inputs to a temporary folder beside the output (its size is in the notes), and
   each block replays its calls for the layer-input Hessians when it is quantized (:mod:`compressdit.streaming_gptq`).
3. The source is deleted, then ``reload`` per output: stock ``FluxTransformer2DModel.from_pretrained`` (after
   ``import compressdit``) with ``device_map="auto"`` and a CPU memory cap (the rest offloaded to disk by
   accelerate), and one flow-matching Euler step on a small latent.

Writes ``bench/results/stream_flux_cpu.{json,md}``, keeping the rows of earlier runs for other recipes (one
recipe per run fits a small disk: source 24 GB + output + offload); deletes the source, the outputs and the offload
folders::

    timeout 14400 python bench/stream_flux.py --work /work/stream-bench --recipes rtn-w8a8 rtn-w4a16
    timeout 7200 python bench/stream_flux.py --work /work/stream-bench --recipes w8a8 --calib-samples 2 --calib-steps 2
    timeout 21600 python bench/stream_flux.py --work /work/stream-bench --recipes w4a16 --calib-samples 2 \
        --calib-steps 1 --threads 1  # GPTQ: ~6 min per double block, ~4.5 per single block at one thread
    timeout 3000 python bench/stream_flux.py --work /work/stream-bench-smoke --blocks 1,1 --recipes w4a16 \
        --calib-samples 2 --calib-steps 1 --threads 1 --max-memory 2GB --cpu-memory 1GiB  # every FLUX layer shape
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# FLUX.1-dev's transformer/config.json
FLUX_DEV = {"attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
            "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
            "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}


def vm_hwm_mib() -> float:
    """This process's peak resident set (``VmHWM``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def folder_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9


def make_source(folder: Path, shard_size: str, blocks: str) -> dict:
    """Random bf16 weights, one shard in memory at a time, laid out as save_pretrained would."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from compressdit.io.shards import INDEX_NAME, plan_shards

    started = time.perf_counter()
    with init_empty_weights():
        double, single = (int(b) for b in blocks.split(","))
        model = FluxTransformer2DModel.from_config({**FLUX_DEV, "num_layers": double, "num_single_layers": single})
    meta = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    layout = plan_shards(meta, shard_size)
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for file, names in layout.filename_to_tensors.items():
        shard = {}
        for name in names:
            shape = meta[name].shape
            scale = 0.02 if len(shape) == 2 else 0.01
            shard[name] = (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)
            if name.endswith("norm.weight") or ".norm_" in name and name.endswith(".weight"):
                shard[name] += 1
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        del shard
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": layout.metadata,
                                                 "weight_map": layout.tensor_to_filename}, indent=2, sort_keys=True))
    model.save_config(folder)
    params = sum(v.numel() for v in meta.values())
    return {"parameters": params, "shards": len(layout.filename_to_tensors), "disk_gb": round(folder_gb(folder), 2),
            "wall_s": round(time.perf_counter() - started, 1), "peak_rss_mib": round(vm_hwm_mib())}


def calibration_inputs(work: Path, recipe: str, samples: int, steps: int, tokens: int) -> tuple[str, list[str], dict]:
    """``recipe`` itself when it has no calibrate stage; else a user recipe with a calibration of ``samples`` x
    ``steps`` (one batch), a prompt file and random embeddings of FLUX.1's widths (T5 4096, CLIP 768) for it."""
    import torch

    from compressdit.models.prompt_encoders import save_prompt_embeddings
    from compressdit.models.text_conditions import TextEmbedding
    from compressdit.recipe import load_recipe

    loaded = load_recipe(recipe)
    calibrate = [s for s in loaded.stages if s.name == "calibrate"]
    if not calibrate:
        return recipe, [], {}
    calibrate[0].config.samples, calibrate[0].config.steps = samples, steps
    calibrate[0].config.batch_size = samples
    loaded.stages = [s for s in loaded.stages if s.name != "evaluate"]
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{recipe}-calib{samples}x{steps}.yaml"
    path.write_text(loaded.dump())
    prompts = [f"calibration prompt {i}" for i in range(samples)]
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    gen = torch.Generator().manual_seed(0)
    embeddings = [TextEmbedding(torch.randn(tokens, FLUX_DEV["joint_attention_dim"], generator=gen),
                                torch.ones(tokens, dtype=torch.long),
                                torch.randn(FLUX_DEV["pooled_projection_dim"], generator=gen)) for _ in prompts + [""]]
    save_prompt_embeddings(work / "embeddings.safetensors", prompts + [""], embeddings)
    c = calibrate[0].config
    setting = {"samples": c.samples, "steps": c.steps, "guidance": c.guidance, "batch_size": c.batch_size,
               "text_tokens": tokens, "image_tokens": 16, "prompts": "random embeddings (T5 4096-d, CLIP 768-d)"}
    return str(path), ["--calib", str(work / "prompts.jsonl"), "--embeddings", str(work / "embeddings.safetensors")], \
        setting


def quantize(source: Path, out: Path, recipe: str, max_memory: str, samples: str, steps: str, tokens: str) -> dict:
    """``compressdit quantize`` as a user runs it (the CLI app in this process)."""
    import io
    from contextlib import redirect_stdout

    from compressdit.cli import app

    started = time.perf_counter()
    path, extra, calibration = calibration_inputs(out.parent / f"inputs-{recipe}", recipe, int(samples), int(steps),
                                                  int(tokens))
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        app(["quantize", str(source), "-r", path, "--no-eval", "-o", str(out), "--json", "--quiet", *extra,
             *(["--max-memory", max_memory] if max_memory != "auto" else [])], standalone_mode=False)
    summary = json.loads(buffer.getvalue()[buffer.getvalue().index("{"):])
    shards = len(list(out.glob("*.safetensors")))
    return {"recipe": recipe, "loadavg_end": [round(v, 2) for v in os.getloadavg()], "wall_s": round(time.perf_counter() - started, 1), "peak_rss_mib": round(vm_hwm_mib()),
            "quantized_modules": summary["quantized_modules"], "notes": summary["notes"], "shards": shards,
            "disk_gb": round(folder_gb(out), 2), "timings": summary.get("timings", {}), "calibration": calibration,
            "index": (out / "diffusion_pytorch_model.safetensors.index.json").exists()}


def reload_and_step(out: Path, offload: Path, cpu_memory: str) -> dict:
    """Stock from_pretrained with a CPU memory cap (the rest on disk), then one Euler step on a small latent."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    import compressdit  # noqa: F401  (registers the quantizer)

    started = time.perf_counter()
    model = FluxTransformer2DModel.from_pretrained(out, torch_dtype=torch.bfloat16, device_map="auto",
                                                   max_memory={"cpu": cpu_memory}, offload_folder=offload).eval()
    load_s = time.perf_counter() - started
    placement = {}
    for device in model.hf_device_map.values():
        placement[str(device)] = placement.get(str(device), 0) + 1
    load_rss = vm_hwm_mib()
    gen = torch.Generator().manual_seed(0)
    tokens, text = 64, 16  # an 8x8 packed latent (a 128x128 image), 16 text tokens
    latents = torch.randn(1, tokens, 64, generator=gen).to(torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    started = time.perf_counter()
    with torch.no_grad():
        velocity = model(hidden_states=latents, encoder_hidden_states=torch.randn(1, text, 4096, generator=gen).to(
            torch.bfloat16), pooled_projections=torch.randn(1, 768, generator=gen).to(torch.bfloat16),
            timestep=(t / 1000).expand(1).to(torch.bfloat16), img_ids=torch.zeros(tokens, 3),
            txt_ids=torch.zeros(text, 3), guidance=torch.full((1,), 3.5, dtype=torch.bfloat16), return_dict=False)[0]
        latents = scheduler.step(velocity, t, latents).prev_sample
    return {"loadavg_end": [round(v, 2) for v in os.getloadavg()], "load_s": round(load_s, 1), "step_s": round(time.perf_counter() - started, 1),
            "load_peak_rss_mib": round(load_rss), "peak_rss_mib": round(vm_hwm_mib()), "cpu_memory_cap": cpu_memory,
            "placement": placement, "finite": bool(torch.isfinite(latents).all()),
            "offload_gb": round(folder_gb(offload), 2) if offload.exists() else 0.0}


def child(step: str, *args: str) -> dict:
    """Run ``step`` in a fresh process (its own VmHWM) and return its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "_child", step, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # -9: killed (the kernel's OOM killer, when memory ran out)
        raise RuntimeError(f"{step} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "memory_gib": round(mem / 2**20, 1),
            "torch": torch.__version__, "python": platform.python_version(),
            "diffusers": __import__("diffusers").__version__, "loadavg_start": [round(v, 2) for v in os.getloadavg()]}


def markdown(result: dict) -> str:
    m, s = result["machine"], result["source"]
    lines = ["# Streaming quantization of a FLUX.1-size transformer (random bf16 weights)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), {m['memory_gib']} GiB RAM shared "
             f"with other jobs (this run; each row names its own); torch {m['torch']}, diffusers {m['diffusers']}. Load average at start: "
             f"{m['loadavg_start']}.", "",
             f"Source: `FluxTransformer2DModel` with FLUX.1-dev's config"
             f"{'' if result.get('blocks', '19,38') == '19,38' else ' (double,single blocks: ' + result['blocks'] + ')'}"
             f", {s['parameters'] / 1e9:.2f}B parameters, "
             f"{s['disk_gb']} GB bf16 in {s['shards']} shards (written in {s['wall_s']} s, peak RSS "
             f"{s['peak_rss_mib']} MiB). Loaded in memory the usual way it would take "
             f"{s['parameters'] * 4 / 1e9:.0f} GB (float32).", "",
             "| recipe | machine | quantize wall | quantize peak RSS | output | shards | reload (device_map auto, CPU cap) | "
             "reload peak RSS | one Euler step | step peak RSS |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for q in result["runs"] + result.get("earlier_runs", []):
        r = q.get("reload", {})
        if "error" in r:
            r = {"load_s": "not run or failed (see the JSON)"}
        where = q.get("machine", m)
        lines.append(f"| {q['recipe']} | {where['cpu']}, {where['threads']} thread{'s' * (where['threads'] != 1)} | "
                     f"{q['wall_s']} s | {q['peak_rss_mib']} MiB | {q['disk_gb']} GB | {q['shards']} | "
                     f"{r.get('load_s', '—')} s, cap {r.get('cpu_memory_cap', '—')}, modules per device "
                     f"{r.get('placement', '—')} | {r.get('load_peak_rss_mib', '—')} MiB | {r.get('step_s', '—')} s | "
                     f"{r.get('peak_rss_mib', '—')} MiB |")
    lines += ["", f"Notes from the runs: {result['runs'][0]['notes'][0] if result['runs'] else ''}.", ""]
    for q in result["runs"] + result.get("earlier_runs", []):
        if q.get("calibration"):
            c = q["calibration"]
            lines.append(f"`{q['recipe']}` calibration (a user recipe: the shipped one calibrates on 32 samples x 10 "
                         f"steps): {c['samples']} samples x {c['steps']} steps, guidance {c['guidance']}, one batch, "
                         f"{c['image_tokens']} image + {c['text_tokens']} text tokens, {c['prompts']}; timings "
                         f"{q.get('timings')}; {'; '.join(q['notes'][2:])}.")
            lines.append("")
    earlier = dict.fromkeys(e["command"] for e in result.get("earlier_runs", []))
    lines += [f"Command: `{result['command']}`" + ("; earlier rows: " + ", ".join(f"`{c}`" for c in earlier)
                                                   if earlier else "")
              + ". Peak RSS is each process's own `VmHWM`. Wall times are on a shared 2-core machine (noise from other "
              "jobs); the disk is part of the story (the source does not fit in the page cache).", ""]
    lines += [p for remark in result.get("remarks", []) for p in (remark, "")]
    return "\n".join(lines)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: clean up (and kill the running step)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Scratch folder for source, outputs, offload.")
    parser.add_argument("--recipes", nargs="+", default=["rtn-w8a8", "rtn-w4a16"])
    parser.add_argument("--shard-size", default="5GB")
    parser.add_argument("--blocks", default="19,38", help="Double,single block counts (smoke test: 1,1).")
    parser.add_argument("--cpu-memory", default="4GiB", help="CPU memory cap of the reload (rest on disk).")
    parser.add_argument("--max-memory", default="auto", help="compressdit's --max-memory (auto: available memory).")
    parser.add_argument("--keep", action="store_true", help="Keep source and outputs (default: deleted).")
    parser.add_argument("--calib-samples", type=int, default=2, help="Calibration samples of calibrated recipes.")
    parser.add_argument("--calib-steps", type=int, default=2, help="Calibration sampling steps of calibrated recipes.")
    parser.add_argument("--calib-tokens", type=int, default=16, help="Text tokens of the calibration prompts.")
    parser.add_argument("--reuse-source", action="store_true",
                        help="Use WORK/source and its WORK/source.json record when a run left them (with --keep).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every step (OMP_NUM_THREADS; default: torch's own choice).")
    args = parser.parse_args()
    if args.threads:  # before torch is imported here or in a child
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    command = "python bench/stream_flux.py " + " ".join(sys.argv[1:])
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = {"command": command, "machine": machine(), "blocks": args.blocks, "date": date, "runs": []}
    source = args.work / "source"
    name = "stream_flux_cpu" if args.blocks == "19,38" else f"stream_flux_smoke_{args.blocks.replace(',', '_')}"
    earlier = RESULTS / f"{name}.json"
    if earlier.exists():  # rows of earlier runs for other recipes stay, with the command and machine they ran with
        before = json.loads(earlier.read_text())
        older = before.get("earlier_runs", [])
        if isinstance(older, dict):  # the first format: one earlier invocation, {command, date, machine, runs}
            older = [{"command": older["command"], "date": older["date"], "machine": older["machine"], **run}
                     for run in older["runs"]]
        result["earlier_runs"] = [run if "command" in run else {"command": before["command"], "date": before["date"],
                                                                  "machine": before["machine"], **run}
                                  for run in before["runs"] + older if run["recipe"] not in args.recipes]
        result["remarks"] = before.get("remarks", [])
    try:
        record = args.work / "source.json"
        if args.reuse_source and record.exists() and source.exists():
            result["source"] = {**json.loads(record.read_text()), "reused": True}
        else:
            result["source"] = child("source", str(source), args.shard_size, args.blocks)
            if args.keep:
                record.write_text(json.dumps(result["source"]))
        print("source", result["source"], flush=True)
        save(result, name)
        for recipe in args.recipes:
            run = child("quantize", str(source), str(args.work / recipe), recipe, args.max_memory,
                        str(args.calib_samples), str(args.calib_steps), str(args.calib_tokens))
            print("quantize", run, flush=True)
            result["runs"].append(run)
            save(result, name)
        if not args.keep:
            shutil.rmtree(source)
        for run in result["runs"]:
            out = args.work / run["recipe"]
            try:
                run["reload"] = child("reload", str(out), str(args.work / f"offload-{run['recipe']}"),
                                      args.cpu_memory)
            except RuntimeError as exc:  # recorded; the next output is still reloaded
                run["reload"] = {"error": str(exc).splitlines()[0]}
            print("reload", run["reload"], flush=True)
            save(result, name)
            if not args.keep:
                shutil.rmtree(args.work / f"offload-{run['recipe']}", ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


def save(result: dict, name: str) -> None:
    """Results so far (a long run that times out keeps its finished steps)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(result))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        steps = {"source": lambda folder, size, blocks: make_source(Path(folder), size, blocks),
                 "quantize": lambda source, out, recipe, mem, *calib: quantize(Path(source), Path(out), recipe, mem,
                                                                               *calib),
                 "reload": lambda out, offload, cap: reload_and_step(Path(out), Path(offload), cap)}
        print(json.dumps(steps[sys.argv[2]](*sys.argv[3:])))
    else:
        main()
