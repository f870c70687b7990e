"""The data path: the shard-builder library (shards; data_prep/build_shards.py is its CLI) and the stream that
reads shards into training batches with exact resume (stream)."""
