"""`python -m pipeline.compare` (the command recorded in docs/results.md): the method comparison lives in
pipeline/demo/compare/."""

import sys

if __name__ == "__main__":
    from pipeline.demo.compare.app import main

    sys.exit(main())
