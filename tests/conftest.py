"""Shared fixtures: tiny random diffusers models and pipeline folders (no training, no hub)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels (compressdit.quant.gpu_triton) run in Triton's interpreter on CPU tensors: read when a kernel is
    # decorated, so set before anything imports triton (tests/quant/test_quant_gpu_triton.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("COMPRESSDIT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "cd"))
#: the suite's cache folder (tests that need one of their own take :func:`fresh_cache`)
SUITE_CACHE = Path(os.environ["COMPRESSDIT_CACHE"]).resolve()
torch.set_num_threads(1)


def fresh_cache(path: Path) -> Path:
    """An empty compressdit cache folder at ``path`` (no calibration statistics, no encoded prompts) whose compiled CPU
    libraries are the suite's: its ``native`` folder links to the suite cache's, so a process given this cache builds
    them only where the suite has not (about a minute of compiling on a 2-core CPU; builds are keyed by their inputs
    and written by rename, so processes may share one folder)."""
    shared = SUITE_CACHE / "native"
    shared.mkdir(parents=True, exist_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "native").exists():
        (path / "native").symlink_to(shared, target_is_directory=True)
    return path


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count ``count`` within, the count before restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def native_ops_built() -> bool:
    """Whether compressdit's C++ op library is loaded; asserts it is wherever the C library builds and a C++ compiler
    exists (elsewhere, tests of the ops check the Python path the kernels fall back to instead)."""
    import shutil

    from compressdit.quant import cpu_native

    wanted = cpu_native.native_library() is not None and shutil.which(os.environ.get("CXX", "c++")) is not None
    assert cpu_native.native_ops() == wanted
    return wanted


@pytest.fixture
def gemm_threads(monkeypatch):
    """A function giving torch ``n`` threads for the rest of the test (the count before comes back after it) and
    group_gemm its team of threads even on a test's small GEMMs."""
    from compressdit.quant import cpu_native

    monkeypatch.setattr(cpu_native, "GROUP_GEMM_TEAM_MIN_WORK", 0)
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def decoded_kernels(monkeypatch):
    """Low-bit activations in groups on the decoded-weight kernels (``cpu-decoded-*``, ``cpu-int4-weight``,
    ``cpu-int-dense-*``, ``cpu-twinlog-dense``) on every CPU: on CPUs with AVX512-VNNI the integer GEMM of
    ``cpu-int-groups`` / ``cpu-twinlog-groups`` takes them by default (tested in tests/quant/test_quant_cpu_kernels.py)."""
    from compressdit.quant import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "group_gemm_ready", lambda: False)


@pytest.fixture
def fp32_kernels(monkeypatch):
    """Small quantized layers on their fp32 kernels on every CPU (the reference's numbers up to summation order):
    on CPUs with AMX, bf16 kernels on oneDNN's microkernel take them by default (``cpu_dense._brgemm_shape``; those
    are tested against the reference within bf16 rounding in tests/quant/test_quant_cpu_dense.py), and on CPUs with
    AVX512-VNNI the integer GEMM of ``cpu-int-groups`` / ``cpu-twinlog-groups`` takes low-bit activations in groups
    (tested in tests/quant/test_quant_cpu_kernels.py)."""
    from compressdit.quant import cpu_dense, cpu_kernels

    monkeypatch.setattr(cpu_dense, "bf16_brgemm", lambda: False)
    monkeypatch.setattr(cpu_kernels, "group_gemm_ready", lambda: False)


def tiny_dit(layers: int = 2, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                                  num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                  norm_type="ada_norm_zero")
    with torch.no_grad():  # uneven per-row scales, non-zero adaLN: hides nothing behind zero init
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 * (1 + torch.rand(p.shape[0], *[1] * (p.dim() - 1)) * 3))
    return model.eval()


def tiny_pixart(layers: int = 2, caption_channels: int = 384, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                                     num_layers=layers, sample_size=8, patch_size=2, cross_attention_dim=64,
                                     caption_channels=caption_channels, norm_type="ada_norm_single",
                                     use_additional_conditions=False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    from compressdit.zoo.train_basics import vae_config

    torch.manual_seed(0)
    return AutoencoderKL(**vae_config()).eval()


def save_dit_pipeline(path, layers: int = 2):
    from diffusers import DiTPipeline, DPMSolverMultistepScheduler

    from compressdit.zoo.train_dits import noise_scheduler_config

    pipe = DiTPipeline(transformer=tiny_dit(layers), vae=tiny_vae(),
                       scheduler=DPMSolverMultistepScheduler(**noise_scheduler_config()))
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def dit_pipeline_dir(tmp_path_factory):
    """A stock ``DiTPipeline`` folder with a tiny random transformer and VAE."""
    return save_dit_pipeline(tmp_path_factory.mktemp("tiny") / "dit-pipe")


@pytest.fixture(scope="session")
def dit_model_dir(tmp_path_factory):
    """A bare ``DiTTransformer2DModel`` folder."""
    path = tmp_path_factory.mktemp("tiny") / "dit-model"
    tiny_dit().save_pretrained(path)
    return path


def _random_weights(model, scale: float = 0.1):
    """Non-zero weights everywhere: no zero-initialised gate hides a block."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


def tiny_sd3(layers: int, dual_attention_layers: tuple, text_dim: int, pooled_dim: int, seed: int = 0):
    """SD3(.5) MMDiT: the last block is ``context_pre_only``; listed blocks get dual attention."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return _random_weights(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_dim, caption_projection_dim=32, pooled_projection_dim=pooled_dim,
        pos_embed_max_size=16, dual_attention_layers=dual_attention_layers, qk_norm="rms_norm"))


def tiny_flux(double: int, single: int, heads: int, text_dim: int, pooled_dim: int, seed: int = 0):
    """FLUX.1: ``double`` dual-stream then ``single`` single-stream blocks, heads of 16, guidance embedding."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return _random_weights(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=heads, joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6)))


def folder_state(folder, cache):
    """A ``PipelineState`` for the pipeline saved at ``folder`` (its transformer is the model), quiet, with
    ``cache`` as cache folder and ``cache / "out"`` as workdir."""
    from compressdit.io.sources import load_source
    from compressdit.models import adapter_for
    from compressdit.stages import PipelineState

    source = load_source(str(folder))
    return PipelineState(source=source, adapter=adapter_for(source.transformer), model=source.transformer,
                         workdir=cache / "out", reference_spec=str(folder), quiet=True, cache_dir=cache)


@pytest.fixture(scope="session")
def text_pipeline_dir(tmp_path_factory):
    """``text_pipeline_dir(family)``: a tiny stock PixArt-alpha / SD3 / FLUX pipeline folder with its own random
    T5 / CLIP text encoders (``tests/tiny_pipelines.py``), saved once per session and family."""
    from tests.tiny_pipelines import save_pipeline

    root = tmp_path_factory.mktemp("text-pipelines")
    saved = {}

    def get(family: str):
        if family not in saved:
            saved[family] = save_pipeline(family, root / family)
        return saved[family]

    return get
