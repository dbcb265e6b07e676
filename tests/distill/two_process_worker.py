"""One rank of the 2-process distillation test (``torchrun --nproc_per_node 2``, gloo on CPU).

Writes ``rank{N}.json`` with a hash of the final student weights and the loss history into ``argv[1]``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from tests.distill.test_distill_trainer import make_pair, synthetic_data, tiny_config
    from compressdit.distill import distill
    from compressdit.models import ADAPTERS

    accelerator = Accelerator(cpu=True)
    teacher, student = make_pair()
    metrics = distill(student, teacher, ADAPTERS.get("dit"), tiny_config(steps=2), out / "work", synthetic_data(),
                      origin=[0, 2], accelerator=accelerator, quiet=True)
    digest = hashlib.sha256()
    for name, tensor in sorted(student.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "hash": digest.hexdigest(), "processes": metrics["processes"], "steps": metrics["steps"],
        "history": metrics["history"]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
