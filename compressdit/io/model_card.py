"""The compressed model's own ``MODEL_CARD.md``: recipe, what was quantized or pruned, the report, how to load.

Written by the orchestrator once the checkpoint (and its report, when the recipe evaluates) is in the output
folder. Every fact comes from that folder and the reference folder (``config.json`` files, tensor bytes) or from
the report dict, so the card describes exactly what was saved.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from compressdit.evaluate.report import format_value
from compressdit.io.checkpoint import folder_bytes
from compressdit.quant.layers import QuantizedLinear
from compressdit.quant.spec import LinearQuantSpec

if TYPE_CHECKING:
    from compressdit.recipe import Recipe

CARD_NAME = "MODEL_CARD.md"
# config keys that say nothing about the architecture
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "quantization_config", "_pre_quantization_dtype"}


def _transformer_folder(folder: Path) -> tuple[Path, bool]:
    sub = Path(folder) / "transformer"
    return (sub, True) if (sub / "config.json").exists() else (Path(folder), False)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _quantization_lines(model: nn.Module, quant: dict) -> list[str]:
    modules = quant.get("modules", {})
    if not modules:
        return ["- quantization: none (every linear layer keeps its float weights)"]
    specs = {name: LinearQuantSpec(**spec) for name, spec in modules.items()}
    schemes = Counter(spec.label for spec in specs.values())
    bits = {spec.label: spec.bits_per_weight for spec in specs.values()}
    lines = [f"- quantized: {len(specs)} linear layers, stored packed:"]
    lines += [f"  - {label}: {count} layers, {bits[label]:g} code bits per weight (plus scales / codebook)"
              for label, count in schemes.most_common()]
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, QuantizedLinear)]
    if kept:
        lines.append(f"- kept in full precision: {len(kept)} linear layers ({', '.join(kept[:8])}"
                     + (", ..." if len(kept) > 8 else "") + ")")
    return lines


def _pruning_lines(reference: dict, candidate: dict, structure: dict) -> list[str]:
    changed = [f"`{key}` {reference[key]} → {candidate[key]}" for key in sorted(set(reference) & set(candidate))
               if key not in _BOOKKEEPING and reference[key] != candidate[key]]
    lines = [f"- architecture changed from the reference: {', '.join(changed)}"] if changed else []
    width, heads = structure.get("width", {}), structure.get("heads", {})
    if width:
        example = next(iter(width.items()))
        lines.append(f"- width-pruned: {len(width)} linear layers ([out, in] recorded in "
                     f"`quantization_config.structure`, e.g. {example[0]} → {example[1]})")
    if heads:
        lines.append(f"- attention heads pruned in {len(heads)} attention modules")
    return lines or ["- pruning: none (same blocks and widths as the reference)"]


def _metric_lines(report: dict[str, Any] | None, report_dir: Path) -> list[str]:
    if not report or not report.get("metrics"):
        return ["Not evaluated: the recipe has no `evaluate` stage (run `compressdit evaluate` on this folder)."]
    columns = report.get("columns") or ["candidate", "reference"]
    lines = ["Same seeds and samples for every column (`report/report.md` has the plots and sample grids).", ""]
    lines += [f"- {col}: {report[col]}" for col in columns if isinstance(report.get(col), str)]
    lines += ["", "| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for metric in report["metrics"]:
        unit = f" [{metric['unit']}]" if metric.get("unit") else ""
        cells = [format_value(metric["values"].get(col)) for col in columns]
        lines.append(f"| {metric['name']}{unit} | " + " | ".join(cells) + " |")
    if (report_dir / "samples_candidate.png").exists():
        lines += ["", "![candidate samples](report/samples_candidate.png)"]
    return lines


def _load_lines(folder: Path, display: str, transformer_class: str, is_pipeline: bool, quantized: bool) -> list[str]:
    index = Path(folder) / "model_index.json"
    imports = ["import torch"] + (["import compressdit  # registers the quantizer with diffusers"] if quantized else [])
    if index.exists():
        cls = json.loads(index.read_text())["_class_name"]
        call = f'pipe = {cls}.from_pretrained("{display}", torch_dtype=torch.float32)'
    else:
        cls = transformer_class
        sub = ', subfolder="transformer"' if is_pipeline else ""
        call = f'transformer = {cls}.from_pretrained("{display}"{sub}, torch_dtype=torch.float32)'
    lines = ["```python", *imports, f"from diffusers import {cls}", "", call, "```"]
    if quantized:
        lines += ["", "Without `import compressdit`, diffusers fails with \"Unknown quantization type\". Pick the "
                  "dtype with `torch_dtype=` when loading: `.to(dtype)` raises on a quantized model (moving devices "
                  "is fine). `model.dequantize()` gives plain linears; `compressdit export --dequantize` writes a "
                  "folder that needs no compressdit."]
    return lines


def write_model_card(folder: Path, *, display_path: str, recipe: "Recipe", reference_name: str,
                     reference_folder: Path, model: nn.Module, report: dict[str, Any] | None) -> Path:
    """Write ``folder/MODEL_CARD.md`` for the compressed model saved in ``folder`` (``display_path``: where the
    user will find it, used in the loading example)."""
    transformer, is_pipeline = _transformer_folder(folder)
    reference_transformer, _ = _transformer_folder(reference_folder)
    config, reference_config = _config(transformer), _config(reference_transformer)
    quant = config.get("quantization_config") or {}
    size, reference_size = folder_bytes(transformer), folder_bytes(reference_transformer)
    lines = [f"# {recipe.name} of {reference_name}", "",
             f"Compressed with compressdit from `{reference_name}` ({config['_class_name']}). "
             f"This card describes the compressed model; the reference's own card stays with the reference.", ""]
    if recipe.description:
        lines += [recipe.description.strip(), ""]
    lines += ["## Recipe", "", f"Stages: {' → '.join(s.name for s in recipe.stages)}; the resolved recipe is "
              "`compressdit_recipe.yaml` in this folder.", "", "## What was compressed", ""]
    lines += _quantization_lines(model, quant)
    lines += _pruning_lines(reference_config, config, quant.get("structure") or {})
    lines += [f"- transformer on disk: {size:,} bytes (reference {reference_size:,} bytes, "
              f"{reference_size / max(size, 1):.2f}x smaller)", ""]
    lines += ["## Quality", ""] + _metric_lines(report, Path(folder) / "report") + [""]
    lines += ["## How to load", ""] + _load_lines(folder, display_path, config["_class_name"], is_pipeline,
                                                  bool(quant)) + [""]
    path = Path(folder) / CARD_NAME
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
