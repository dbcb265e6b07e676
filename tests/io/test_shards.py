"""Shard-wise reading (LazyWeights) and writing (ShardWriter) against diffusers' own sharded save."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights

from compressdit.errors import CheckpointError
from compressdit.io.shards import INDEX_NAME, LazyWeights, ShardWriter, expected_tensors, plan_shards
from tests.conftest import tiny_flux


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    model = tiny_flux(1, 1, 4, 64, 64).to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("shards") / "src"
    model.save_pretrained(folder, max_shard_size="60KB")
    return model, folder


def test_lazy_weights_reads_named_tensors_across_shards(sharded):
    model, folder = sharded
    assert len(json.loads((folder / INDEX_NAME).read_text())["weight_map"]) == len(model.state_dict())
    weights = LazyWeights(folder)
    names = ["x_embedder.weight", "single_transformer_blocks.0.proj_out.weight", "proj_out.bias"]
    read = weights.read(names, dtype=torch.float32)
    state = model.state_dict()
    for name in names:
        assert read[name].dtype == torch.float32 and torch.equal(read[name], state[name].float())
    assert weights.float_numel() == sum(t.numel() for t in state.values())


def test_lazy_weights_names_a_missing_tensor_and_shard(sharded, tmp_path):
    _, folder = sharded
    with pytest.raises(CheckpointError, match="needs tensor nope.weight"):
        LazyWeights(folder).read(["nope.weight"])
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((folder / INDEX_NAME).read_text())
    (broken / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard diffusion_pytorch_model-00001-of-.* is missing"):
        LazyWeights(broken)


def test_shard_writer_matches_save_pretrained_layout(sharded, tmp_path):
    """Tensors arriving block by block land in the files, with the index, that save_pretrained writes."""
    model, folder = sharded
    state = model.state_dict()
    with init_empty_weights():
        meta = type(model).from_config(model.config)
    meta_state = {k: v.to(torch.bfloat16) for k, v in meta.state_dict().items()}
    layout = plan_shards(meta_state, "60KB")
    done: set[str] = set()
    with ShardWriter(tmp_path / "out", layout, expected_tensors(meta_state)) as writer:
        for prefix in ("transformer_blocks.", "single_transformer_blocks.", ""):
            part = {k: v for k, v in state.items() if k.startswith(prefix) and k not in done}
            writer.add(part)
            done |= set(part)
        with pytest.raises(CheckpointError, match="x_embedder.weight was already produced"):
            writer.add({"x_embedder.weight": state["x_embedder.weight"]})
    assert json.loads((tmp_path / "out" / INDEX_NAME).read_text()) == json.loads((folder / INDEX_NAME).read_text())
    ours = LazyWeights(tmp_path / "out")
    assert ours.files.keys() == state.keys()
    assert all(torch.equal(t, state[k]) for k, t in ours.read(list(state)).items())


def test_shard_writer_rejects_wrong_tensors_and_writes_no_index_when_incomplete(tmp_path):
    state = {"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(2, dtype=torch.int8)}
    layout = plan_shards(state, "1GB")
    writer = ShardWriter(tmp_path, plan_shards(state, 40), expected_tensors(state))
    with pytest.raises(CheckpointError, match="a.weight is .*expects \\(4, 4\\) torch.float32"):
        writer.add({"a.weight": torch.zeros(4, 4, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match="c.weight is not part"):
        writer.add({"c.weight": torch.zeros(1)})
    writer.add({"a.weight": torch.zeros(4, 4)})
    with pytest.raises(CheckpointError, match="tensor b.weight was never produced"):
        writer.close()
    assert not (tmp_path / INDEX_NAME).exists()
    assert not layout.is_sharded
