"""M²PT training pipeline: library (m2pt, models, chat, data) and apps (train, evaluate)."""

__version__ = "0.1.0"
