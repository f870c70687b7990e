"""Reusable parts of the training recipe (pipeline/train.py): the process group (dist), run control (the
output-folder lock, stop signals, launcher watch), atomic verified checkpoints and the training progress
(checkpoint), the flags (config), the DeepSpeed config and engine (engine) and the metrics writer and run
state (records)."""
