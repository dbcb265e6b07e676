"""More bad inputs a new user hits, each one stderr line and a non-zero exit before any work, nothing written
(found by a new-user sweep; the helpers are those of ``test_cli_errors``)."""

from __future__ import annotations

import pytest

from tests.integration.test_cli_errors import (assert_nothing_written, assert_one_line_error, offline_env,  # noqa: F401
                                               quantize_args, run_main)


@pytest.mark.parametrize("device, needles", [("tpu", ["--device tpu", "not a torch device"]),
                                             ("cuda:7", ["--device cuda:7"])])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "in-memory"])
def test_an_unusable_device(dit_pipeline_dir, tmp_path, device, needles, stream):
    """``--device tpu --stream`` (or a CUDA device this machine lacks) used to end in a traceback from the shard
    reader after the model was set up."""
    args = quantize_args(dit_pipeline_dir, tmp_path / "out") + ["--device", device] + (["--stream"] if stream else [])
    assert_one_line_error(run_main(*args), *needles)
    assert_nothing_written(tmp_path / "out")


def test_an_output_below_a_file(dit_pipeline_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    out = tmp_path / "notes.txt" / "out"
    assert_one_line_error(run_main(*quantize_args(dit_pipeline_dir, out)), "cannot write", "is a file, not a folder")


def test_a_pipeline_without_its_transformer(dit_pipeline_dir, tmp_path):
    import shutil

    shutil.copytree(dit_pipeline_dir, tmp_path / "pipe", ignore=shutil.ignore_patterns("transformer"))
    assert_one_line_error(run_main(*quantize_args(tmp_path / "pipe", tmp_path / "out")),
                          "pipeline folder without transformer", "vae")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("samples", [0, -1])
def test_too_few_evaluation_samples(dit_pipeline_dir, tmp_path, samples):
    """The option is named once (it read ``--samples.samples``)."""
    line = assert_one_line_error(run_main("quantize", dit_pipeline_dir, "--recipe", "rtn-w8a8", "--out",
                                          tmp_path / "out", "--samples", samples), "--samples", "at least 2")
    assert "--samples.samples" not in line
    assert_nothing_written(tmp_path / "out")


@pytest.fixture(scope="module")
def quantized_dit(dit_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "w8a8"
    assert run_main(*quantize_args(dit_pipeline_dir, out)).code == 0
    return out


@pytest.mark.parametrize("args", [["prune", "--recipe", "width-30", "--no-eval"],
                                  ["moe", "--recipe", "dense2moe-50", "--no-eval"],
                                  ["distill", "--teacher", "TEACHER", "--steps", "2"]],
                         ids=["prune-width", "moe", "distill"])
def test_training_stages_refuse_an_already_quantized_model(quantized_dit, dit_pipeline_dir, tmp_path, args):
    """Width pruning and distillation of a quantized checkpoint used to die in torch (``"normal_kernel_cpu" not
    implemented for 'Char'``, ``"lerp_kernel_scalar" ...``) after loading everything."""
    command, *options = [str(dit_pipeline_dir) if a == "TEACHER" else a for a in args]
    line = assert_one_line_error(run_main(command, quantized_dit, *options, "--out", tmp_path / "out", "--quiet"),
                                 "already quantized", "float model")
    assert ("distill" if command == "distill" else command) in line
    assert_nothing_written(tmp_path / "out")
