"""raycxr: Ray-distributed hyperparameter search and model selection for chest X-ray classification.

The pipeline, one module per stage:
files on disk -> ``ingest`` (Parquet shards) -> ``search`` (Ray Tune over Ray Train trials)
-> ``promote`` (holdout once, exports, model card) -> ``predict``.
"""

__version__ = "0.1.0"
