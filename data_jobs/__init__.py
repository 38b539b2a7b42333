"""Ray Data batch jobs for labelfuse; each runs as ``python -m data_jobs.X`` or under ``ray job submit``.

- :mod:`data_jobs.embed`: encoder embeddings on an actor pool (GPU actors when there are GPUs)
- :mod:`data_jobs.score`: LLM scores on a second actor pool under one shared ledger actor
- :mod:`data_jobs.train`: a model bundle from embedded + scored parquet
- :mod:`data_jobs.backfill`: embed, gate, score and fuse a corpus; resumable, exactly once per id

Ray code lives here and in ``serve/`` only; ``fusion/`` never imports it.
"""
