"""Evaluation parts: benchmark layouts on disk and held-out sets (datasets), batched generation and the LLM judge
(generate), the official scoring rules (metrics) and per-task scoring with the majority baseline (scoring). The
app is pipeline/evaluate.py."""
