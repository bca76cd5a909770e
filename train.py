#!/usr/bin/env python
"""Train, validate or test any lit-meta experiment from a YAML config.

    python train.py fit --config configs/baseline_omniglot.yaml
    python train.py --print_config fit --config configs/baseline_omniglot.yaml
"""

from lit_meta.cli import main, release_process_group

if __name__ == "__main__":
    try:
        main()
    finally:
        release_process_group()
