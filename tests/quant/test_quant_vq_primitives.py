"""Tests for compressdit.quant.vq_primitives: code packing, sub-vectors, k-means, nearest codewords."""

from __future__ import annotations

import pytest
import torch

from compressdit.quant.vq_primitives import (kmeans, nearest_codewords, pack_code_bits, packed_code_bytes,
                                             pairwise_sq_distances, to_subvectors, unpack_code_bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trips_every_code_width(bits):
    codes = torch.randint(0, 2 ** bits, (5, 32), generator=torch.Generator().manual_seed(bits))
    packed = pack_code_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32 * bits // 8)
    assert torch.equal(unpack_code_bits(packed, bits, 32), codes)


def test_packing_follows_the_documented_little_endian_bit_stream():
    codes = torch.tensor([[0b101101, 0b000011, 0b111000, 0b010101]])  # four 6-bit codes = 24 bits
    packed = pack_code_bits(codes, 6)
    stream = sum(int(c) << (6 * j) for j, c in enumerate(codes[0]))
    assert packed[0].tolist() == [(stream >> (8 * i)) & 0xFF for i in range(3)]


def test_rows_that_do_not_fill_whole_bytes_are_refused():
    with pytest.raises(ValueError, match="whole bytes"):
        packed_code_bytes(3, 6)
    with pytest.raises(ValueError, match="whole bytes"):
        pack_code_bits(torch.zeros(2, 3, dtype=torch.long), 6)


def test_subvectors_are_consecutive_input_weights_of_a_row():
    weight = torch.arange(24.0).reshape(3, 8)
    vectors = to_subvectors(weight, 4)
    assert vectors.shape == (6, 4) and torch.equal(vectors[1], weight[0, 4:]) and torch.equal(vectors[2], weight[1, :4])
    with pytest.raises(ValueError, match="not divisible"):
        to_subvectors(weight, 3)


def test_nearest_codewords_match_brute_force_in_chunks():
    gen = torch.Generator().manual_seed(0)
    vectors, codebook = torch.randn(1000, 4, generator=gen), torch.randn(32, 4, generator=gen)
    index, dist = nearest_codewords(vectors, codebook, n=3, chunk=128)
    brute = torch.cdist(vectors, codebook).pow(2)
    expected = brute.topk(3, largest=False)
    assert torch.equal(index, expected.indices)
    assert torch.allclose(dist, expected.values, atol=1e-4)
    assert (dist[:, :-1] <= dist[:, 1:]).all()
    assert (pairwise_sq_distances(vectors, codebook) >= 0).all()


def test_kmeans_is_deterministic_for_a_seed_and_depends_on_it():
    vectors = torch.randn(5000, 4, generator=torch.Generator().manual_seed(1))
    a, b = kmeans(vectors, 64, seed=3), kmeans(vectors, 64, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, kmeans(vectors, 64, seed=4))


def test_kmeans_recovers_well_separated_clusters():
    gen = torch.Generator().manual_seed(2)
    centers = torch.randn(16, 2, generator=gen) * 20
    points = centers.repeat_interleave(200, 0) + 0.01 * torch.randn(3200, 2, generator=gen)
    codebook = kmeans(points, 16, seed=0)
    assert torch.cdist(centers, codebook).min(1).values.max() < 0.05


def test_kmeans_beats_its_seeding_and_uses_every_codeword():
    vectors = torch.randn(20000, 4, generator=torch.Generator().manual_seed(5))
    codebook = kmeans(vectors, 256, seed=0)
    seeded = kmeans(vectors, 256, iterations=0, seed=0)
    error = lambda cb: float(nearest_codewords(vectors, cb)[1].mean())  # noqa: E731
    assert error(codebook) < 0.9 * error(seeded)
    assert torch.bincount(nearest_codewords(vectors, codebook)[0].squeeze(1), minlength=256).min() > 0


def test_kmeans_with_fewer_vectors_than_codewords_is_refused():
    with pytest.raises(ValueError, match="at least 64 vectors"):
        kmeans(torch.randn(10, 4), 64)
