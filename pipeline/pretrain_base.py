"""`python -m pipeline.pretrain_base` (the command recorded in pipeline/demo/assets/tiny_base.json): the app lives
in pipeline/demo/pretrain_base.py."""

import sys

if __name__ == "__main__":
    from pipeline.demo.pretrain_base import main

    sys.exit(main())
