#!/usr/bin/env python
"""Train, validate or test any lit-meta experiment from a YAML config.

    python train.py fit --config configs/baseline_omniglot.yaml
    python train.py --print_config fit --config configs/baseline_omniglot.yaml
"""

from lit_meta.cli import main, release_process_group

if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:  # a SIGTERM stop (status 0) ends as a finished run does; an error exits as it is
        if not stop.code:
            release_process_group()
        raise
    release_process_group()
