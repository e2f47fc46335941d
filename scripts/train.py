#!/usr/bin/env python
"""Train a qsmnet model: ``python scripts/train.py [overrides]`` (Hydra; see docs/training.md).

Examples::

    python scripts/train.py                                  # default: CPU, <= 15 min, beats TKD
    python scripts/train.py experiment=no_dc                 # an ablation
    python scripts/train.py -m loss.w_dc=0,0.5,1             # a sweep (logs/train/multiruns/...)
    python scripts/train.py trainer=gpu experiment=shipped   # the released model
    python scripts/train.py paths.output_dir=RUN ckpt_path=last   # resume a killed run
"""

import sys

import hydra
from omegaconf import DictConfig

from qsmnet.allocator import keep_large_buffers_in_heap
from qsmnet.io.errors import QSMInputError
from qsmnet.training.train import train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    keep_large_buffers_in_heap()
    try:
        return train(cfg)
    except (QSMInputError, FileNotFoundError) as exc:
        # a checkpoint or init_from that is missing or not qsmnet's: one line, as `qsmnet` does
        print(f"train.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
