"""The embedded demo world, behind a boundary: a world of scenes (scenes), the sample image-instruction set drawn
from it (sample_data), the tiny LLaVA and its shipped pretrained weights (tiny, assets/), the app that pretrained
them (pretrain_base) and the method comparison (compare).

Nothing outside this package imports it except the entry points' defaults (pipeline/defaults.py): a run on your
own model and data never loads it (tests/test_layout.py)."""
