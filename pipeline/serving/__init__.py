"""Serving many M²PT adapters in one batch: the adapter bank, mixed-adapter decoding, the OpenAI-compatible app."""
