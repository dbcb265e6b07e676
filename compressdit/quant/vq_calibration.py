"""VQ4DiT calibration pieces: soft codeword assignment over candidate sets, and the block-output loss.

A sub-vector's weight is ``sum_i softmax(logits)_i * codebook[candidate_i]`` over its ``n`` nearest
codewords; logits start at ``log(d_n / d_i)`` (closer codewords weigh more). Training moves the
logits (and later the codebook and bias); the hard assignment at the end takes each arg-max.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.vq_layer import VQLinear, row_scales
from compressdit.quant.vq_primitives import kmeans, nearest_codewords, to_subvectors


class SoftVQLinear(nn.Module):
    """A linear layer during VQ calibration: learnable candidate logits, codebook and bias."""

    def __init__(self, linear: nn.Linear, spec: LinearQuantSpec, candidates: int, seed: int,
                 kmeans_iterations: int) -> None:
        super().__init__()
        self.spec, self.in_features, self.out_features = spec, linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = row_scales(weight) if spec.row_scale else None
        self.register_buffer("row_scale", scale)
        vectors = to_subvectors(weight if scale is None else weight / scale[:, None], spec.vector_dim)
        codebook = kmeans(vectors, spec.codebook_size, iterations=kmeans_iterations, seed=seed)
        codebook = codebook.to(torch.float16).float()  # the stored precision, from the start
        n = min(candidates, spec.codebook_size)
        index, dist = nearest_codewords(vectors, codebook, n)
        dist = dist.clamp_min(1e-12)
        # k <= 256: indices fit a byte (a quarter of int64's memory on real-size layers)
        self.register_buffer("candidates", index.reshape(self.out_features, -1, n).to(torch.uint8))
        self.logits = nn.Parameter(torch.log(dist[:, -1:] / dist).reshape(self.out_features, -1, n))
        self.codebook = nn.Parameter(codebook)
        self.bias = nn.Parameter(linear.bias.detach().float().clone()) if linear.bias is not None else None
        self.register_buffer("frozen", torch.zeros(self.logits.shape[:2], dtype=torch.bool))
        decoded = codebook[index[:, 0]].reshape(weight.shape)
        decoded = decoded if scale is None else decoded * scale[:, None]
        self.kmeans_error = float((decoded - weight).pow(2).sum() / weight.pow(2).sum())  # in weight space

    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=-1)

    def soft_weight(self) -> torch.Tensor:
        chosen = self.codebook[self.candidates.long()]               # [out, m, n, d]
        weight = (self.probabilities().unsqueeze(-1) * chosen).sum(-2).reshape(self.out_features, self.in_features)
        return weight if self.row_scale is None else weight * self.row_scale[:, None]

    def hard_codes(self) -> torch.Tensor:
        return self.candidates.long().gather(-1, self.logits.argmax(-1, keepdim=True)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.soft_weight().to(x.dtype), bias)

    def confidence_regularizer(self) -> torch.Tensor:
        """``n * mean(p (1 - p))``: zero once every assignment is one-hot."""
        p = self.probabilities()
        return p.shape[-1] * (p * (1 - p)).mean()

    @torch.no_grad()
    def update_freezing(self, threshold: float) -> float:
        """Freeze assignments whose top probability passed ``threshold``; return the frozen fraction."""
        self.frozen |= self.probabilities().amax(-1) > threshold
        return float(self.frozen.float().mean())

    def mask_frozen_gradients(self) -> None:
        if self.logits.grad is not None:
            self.logits.grad[self.frozen] = 0

    @torch.no_grad()
    def to_vq_linear(self) -> VQLinear:
        module = VQLinear(self.in_features, self.out_features, self.bias is not None, self.spec,
                          device=self.codebook.device)
        module.load_codes(self.hard_codes(), self.codebook, self.row_scale)
        if self.bias is not None:
            module.bias.data.copy_(self.bias)
        return module


def _flat_outputs(output) -> torch.Tensor:
    """A block's output as one float tensor (MMDiT blocks return tuples of streams)."""
    if isinstance(output, torch.Tensor):
        return output.float().flatten(1)
    tensors = [t.float().flatten(1) for t in output if isinstance(t, torch.Tensor)]
    return torch.cat(tensors, dim=1)


@contextlib.contextmanager
def record_block_outputs(blocks: list[nn.Module]):
    """Collect each block's output of the next forward call (hooks removed on exit)."""
    outputs: list = [None] * len(blocks)

    def hook_for(index: int):
        def hook(module, args, output):
            outputs[index] = _flat_outputs(output)
        return hook

    handles = [block.register_forward_hook(hook_for(i)) for i, block in enumerate(blocks)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def block_output_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of the output MSE relative to the teacher's output energy."""
    losses = [(s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12) for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()
