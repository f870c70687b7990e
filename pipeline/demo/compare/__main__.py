import sys

from pipeline.demo.compare.app import main

sys.exit(main())
