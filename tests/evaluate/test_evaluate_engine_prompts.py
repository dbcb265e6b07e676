"""The evaluation engine embeds its prompts (and the null prompt) with the reference's own text encoder."""

from __future__ import annotations

import copy

import pytest
import torch

from compressdit.errors import UnsupportedModelError
from compressdit.evaluate.engine import Entry, EvalSettings, _layer_sqnr, _step_latency, _trajectory_errors
from compressdit.io.sources import load_source
from compressdit.models import adapter_for

torch.set_num_threads(1)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fidelity_metrics_run_through_the_pipeline_encoder(family, text_pipeline_dir, tmp_path):
    source = load_source(str(text_pipeline_dir(family)), cache_dir=tmp_path)
    adapter, reference = adapter_for(source.transformer), source.transformer
    encoder = source.prompt_encoder
    # one step: the engine records timesteps as int, which truncates the later (fractional) flow-matching ones
    settings = EvalSettings(samples=2, steps=1, timing_batch=2)
    twin = Entry("candidate", copy.deepcopy(reference), "an identical copy", compressed_layers=["proj_out"])
    with pytest.raises(UnsupportedModelError, match="--text-encoder"):  # without the encoder the captions cannot be embedded
        _trajectory_errors(adapter, reference, [twin], ["a bag", "a coat"], source.scheduler, settings)
    errors = _trajectory_errors(adapter, reference, [twin], ["a bag", "a coat"], source.scheduler, settings, encoder)
    assert errors["timesteps"] == [1000] and errors["series"]["candidate"] == [0.0]
    with torch.no_grad():
        twin.model.proj_out.weight.mul_(1.1)
    sqnr = _layer_sqnr(adapter, reference, [twin], ["a bag", "a coat"], settings, encoder)
    assert sqnr["layers"] == ["proj_out"] and 10 < sqnr["series"]["candidate"][0] < 30  # 20*log10(1/0.1) = 20 dB
    assert _step_latency(adapter, reference, settings, repeats=1, prompt_encoder=encoder) > 0
    assert encoder.encoded >= 3  # two captions and "" (plus the latency batch's captions)



def test_report_timing_takes_models_in_turn_and_keeps_each_fastest_step(monkeypatch):
    """step_latencies: one step of every model per round, the order rotated each round, each model's fastest step
    kept (a burst from another job on one step does not count)."""
    import compressdit.evaluate.engine as engine
    from compressdit.models import ADAPTERS
    from tests.conftest import tiny_dit

    entries = [Entry(column, tiny_dit(layers=1), column) for column in ("candidate", "reference", "baseline")]
    cost = {"candidate": 3.0, "reference": 1.0, "baseline": 2.0}  # seconds per step on a fake clock
    calls, now = [], [0.0]

    def step(adapter, model, *args):
        column = next(e.column for e in entries if e.model is model)
        calls.append(column)
        now[0] += cost[column] + (50.0 if len(calls) == 4 else 0.0)  # a burst on the first timed step

    monkeypatch.setattr(engine, "guided_prediction", step)
    monkeypatch.setattr(engine.time, "perf_counter", lambda: now[0])
    latency = engine.step_latencies(ADAPTERS.get("dit"), entries, EvalSettings(timing_batch=2), rounds=4)
    assert latency == cost
    timed = calls[3:]  # after one warm-up step each
    assert timed[:6] == ["candidate", "reference", "baseline", "reference", "baseline", "candidate"]
    assert len(timed) == 12 and all(timed.count(c) == 4 for c in cost)


@pytest.mark.parametrize("max_rounds,expected", [(31, 7), (5, 5)])
def test_report_timing_adds_rounds_while_within_its_budget(monkeypatch, max_rounds, expected):
    """Quick steps get more rounds than the minimum (each model a better chance of a quiet moment on a shared
    machine) until the timing has taken ``budget_s`` seconds, never more than ``max_rounds``."""
    import compressdit.evaluate.engine as engine
    from compressdit.models import ADAPTERS
    from tests.conftest import tiny_dit

    entries = [Entry(column, tiny_dit(layers=1), column) for column in ("candidate", "reference", "baseline")]
    calls, now = [], [0.0]

    def step(adapter, model, *args):
        calls.append(model)
        now[0] += 0.1

    monkeypatch.setattr(engine, "guided_prediction", step)
    monkeypatch.setattr(engine.time, "perf_counter", lambda: now[0])
    latency = engine.step_latencies(ADAPTERS.get("dit"), entries, EvalSettings(timing_batch=2), rounds=4, budget_s=2.0,
                                    max_rounds=max_rounds)
    assert latency == pytest.approx({"candidate": 0.1, "reference": 0.1, "baseline": 0.1})
    assert len(calls) == 3 + 3 * expected  # one warm-up each, then 0.3 s a round until 2 s (7 rounds) or the cap


def test_the_report_says_when_the_quantized_columns_run_the_c_gelu():
    """A column whose quantized projection feeds a tanh GELU runs compressdit's C GELU (set_module swaps it): the
    report's note says so where the reference runs PyTorch's; nothing where no column does."""
    import copy

    import compressdit.evaluate.engine as engine
    from compressdit.quant.layers import QuantLinear
    from compressdit.quant.spec import LinearQuantSpec
    from compressdit.quant.transform import set_module
    from tests.conftest import tiny_dit

    reference = Entry("reference", tiny_dit(layers=1), "reference")
    baseline = Entry("baseline", copy.deepcopy(reference.model), "baseline")
    candidate = Entry("candidate", copy.deepcopy(reference.model), "candidate")
    entries = [candidate, reference, baseline]
    assert engine.native_gelu_notes(reference, entries) == []
    name = next(n for n, m in candidate.model.named_modules() if n.endswith("ff.net.0.proj"))
    linear = candidate.model.get_submodule(name)
    set_module(candidate.model, name, QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=8)))
    [note] = engine.native_gelu_notes(reference, entries)
    assert note.startswith("candidate runs the tanh GELU") and "baseline" not in note
