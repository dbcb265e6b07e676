"""One rank of the 2-process calibration test (``torchrun --nproc_per_node 2``, gloo on CPU).

Writes this rank's statistics to ``argv[2]/rank{N}.safetensors`` for the model folder ``argv[1]``, and its
batches to ``rank{N}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(folder: Path, out: Path) -> None:
    torch.set_num_threads(1)
    from accelerate import PartialState

    from compressdit.calibration.distributed import rank_batches
    from tests.calibration.test_calibration_distributed import calibrate

    state = PartialState(cpu=True)  # gloo process group from torchrun's environment (accelerate launch --cpu)
    stats = calibrate(folder)
    stats.save(out / f"rank{state.process_index}.safetensors")
    (out / f"rank{state.process_index}.json").write_text(json.dumps(rank_batches(5, 2)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
