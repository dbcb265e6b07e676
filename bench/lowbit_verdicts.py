"""Pure helpers of bench/lowbit_bars.py: storage accounting of quantized layers and the issue-14 bar verdicts.

A row is a dict ``{"model", "recipe", "status", "metrics": {"fd_real", "fd_ref", "acc", "psnr", "ssim"},
"storage": {...}, "time": {"calibrate_s", "quantize_s", "total_s"}}`` as the runner writes it; ``acc`` is a
fraction, ``fd_real`` the FD-FMNIST to real test images, ``fd_ref`` the FD-FMNIST to the full-precision model's
samples (same seeds), ``psnr`` dB to those samples.
"""

from __future__ import annotations

FULL = "full-precision"
# bar: (candidate, matching round-to-nearest recipe)
W4_PAIRS = (("gptq-w4a8", "rtn-w4a8"), ("w4a8", "rtn-w4a8"), ("gptq-w4a16", "rtn-w4a16"), ("w4a16", "rtn-w4a16"))
W4A4 = ("lrq-w4a4", "svdquant-w4a4")
FP_PAIRS = (("fp4-w4a8", "rtn-w4a8"), ("fp4-w4a6", "rtn-w4a6"))
TIME_LIMIT_S = 20 * 60


def storage_bits(tensor_bytes: dict[str, int], layer_weights: dict[str, int]) -> dict:
    """Bits and bytes per weight of the quantized layers, scales and every other stored tensor of a layer counted
    (codes, scales, low-rank branch, rotation codes), the float bias left out (an unquantized layer keeps it too).

    ``tensor_bytes``: stored tensor name -> bytes (a checkpoint's, or a model's parameters and buffers);
    ``layer_weights``: quantized layer name -> ``in_features * out_features``. A tensor belongs to the layer whose
    name is its longest dotted prefix."""
    owned = {name: 0 for name in layer_weights}
    for key, size in tensor_bytes.items():
        if key.endswith(".bias"):
            continue
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            layer = ".".join(parts[:cut])
            if layer in owned:
                owned[layer] += size
                break
    weights = sum(layer_weights.values())
    stored = sum(owned.values())
    return {"layers": len(layer_weights), "weights": weights, "bytes": stored,
            "bits_per_weight": 8 * stored / weights if weights else None}


def _row(rows: dict, model: str, recipe: str) -> dict | None:
    row = rows.get((model, recipe))
    return row if row is not None and row.get("status") == "ok" else None


def _metric(row: dict | None, name: str):
    return None if row is None else row["metrics"].get(name)


def _all(checks: list[bool | None]) -> bool | None:
    """True / False over the models; None while any is missing."""
    return None if any(c is None for c in checks) else all(checks)


def _bar(rows: dict, models: list[str], recipes: tuple[str, ...], verdict, text: str) -> dict:
    """``verdict(*rows of recipes)`` per model (a dict with ``pass``), ``None`` where a row is missing."""
    per_model = {}
    for model in models:
        found = [_row(rows, model, recipe) for recipe in recipes]
        per_model[model] = None if any(row is None for row in found) else verdict(*found)
    checks = [None if v is None else v["pass"] for v in per_model.values()]
    return {"bar": text, "models": per_model, "pass": _all(checks)}


def w4_bar(rows: dict, models: list[str], candidate: str, rtn: str, psnr_gain: float = 3.0, acc_points: float = 2.0,
           max_bits: float = 4.5) -> dict:
    """W4A8 / weight-only W4: PSNR >= ``psnr_gain`` dB above ``rtn``, class accuracy no more than ``acc_points``
    below full precision, <= ``max_bits`` bits per weight (scales counted), on every model."""
    def verdict(row, base, full):
        gain = row["metrics"]["psnr"] - base["metrics"]["psnr"]
        drop = 100 * (full["metrics"]["acc"] - row["metrics"]["acc"])
        bits = row["storage"]["quantized"]["bits_per_weight"]
        return {"psnr_gain_db": round(gain, 2), "acc_drop_points": round(drop, 2), "bits_per_weight": round(bits, 3),
                "pass": gain >= psnr_gain and drop <= acc_points and bits <= max_bits}

    return _bar(rows, models, (candidate, rtn, FULL), verdict, f"{candidate} vs {rtn}: PSNR +{psnr_gain} dB, accuracy "
                f"within {acc_points} points, <= {max_bits} bits/weight")


def w4a4_bar(rows: dict, models: list[str], candidate: str, fd_ratio: float = 1.25, acc_points: float = 5.0) -> dict:
    """W4A4: FD-FMNIST to real data at most ``fd_ratio`` x full precision's, accuracy within ``acc_points``."""
    def verdict(row, full):
        ratio = row["metrics"]["fd_real"] / full["metrics"]["fd_real"]
        drop = 100 * (full["metrics"]["acc"] - row["metrics"]["acc"])
        return {"fd_real_ratio": round(ratio, 3), "acc_drop_points": round(drop, 2),
                "pass": ratio <= fd_ratio and drop <= acc_points}

    return _bar(rows, models, (candidate, FULL), verdict, f"{candidate}: FD-FMNIST to real data <= {fd_ratio} x full "
                f"precision, accuracy within {acc_points} points")


def lower_fd_bar(rows: dict, models: list[str], candidate: str, baseline: str) -> dict:
    """``candidate``'s FD-FMNIST to the reference samples below ``baseline``'s on every model."""
    def verdict(row, base):
        return {"fd_ref": row["metrics"]["fd_ref"], "baseline_fd_ref": base["metrics"]["fd_ref"],
                "pass": row["metrics"]["fd_ref"] < base["metrics"]["fd_ref"]}

    return _bar(rows, models, (candidate, baseline), verdict,
                f"{candidate}: FD-FMNIST vs reference samples below {baseline}'s")


def head_to_head(rows: dict, models: list[str], a: str, b: str) -> dict:
    """Which of ``a`` / ``b`` wins per model on FD-FMNIST to the reference samples, and by how much (ratio, and
    the PSNR difference in dB)."""
    out = {}
    for model in models:
        ra, rb = _row(rows, model, a), _row(rows, model, b)
        if ra is None or rb is None:
            out[model] = None
            continue
        fa, fb = ra["metrics"]["fd_ref"], rb["metrics"]["fd_ref"]
        out[model] = {"winner": a if fa < fb else b, "fd_ref": {a: fa, b: fb},
                      "fd_ref_ratio_loser_to_winner": round(max(fa, fb) / min(fa, fb), 2) if min(fa, fb) > 0 else None,
                      "psnr_gain_db_of_" + a: round(ra["metrics"]["psnr"] - rb["metrics"]["psnr"], 2)}
    return out


def time_bar(rows: dict, limit_s: float = TIME_LIMIT_S) -> dict:
    """Calibration + quantize wall time on one thread, every finished row; the slowest named."""
    timed = {f"{m}/{r}": row["time"]["total_s"] for (m, r), row in rows.items()
             if row.get("status") == "ok" and r != FULL}
    if not timed:
        return {"bar": f"calibrate + quantize <= {limit_s:.0f} s", "pass": None}
    cpu = {f"{m}/{r}": row["time"]["cpu_s"] for (m, r), row in rows.items()
           if row.get("status") == "ok" and r != FULL and "cpu_s" in row["time"]}
    slowest = max(timed, key=timed.get)
    return {"bar": f"calibrate + quantize <= {limit_s:.0f} s (one thread)", "slowest": slowest,
            "slowest_s": timed[slowest], "slowest_cpu_s": cpu.get(slowest),
            "over": sorted(k for k, v in timed.items() if v > limit_s),
            "over_in_cpu_s": sorted(k for k, v in cpu.items() if v > limit_s),
            "pass": all(v <= limit_s for v in timed.values())}


def verdicts(rows: dict, models: list[str]) -> dict:
    return {
        "w4": [w4_bar(rows, models, c, r) for c, r in W4_PAIRS],
        "w4a4": [w4a4_bar(rows, models, c) for c in (*W4A4, "rtn-w4a4")],
        "w4a4_head_to_head": head_to_head(rows, models, *W4A4),
        "fp4": [lower_fd_bar(rows, models, c, b) for c, b in FP_PAIRS],
        "lrq_w3a4": w4a4_bar(rows, models, "lrq-w3a4"),
        "time": time_bar(rows),
    }
