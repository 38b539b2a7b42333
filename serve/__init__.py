"""labelfuse on Ray Serve: the HTTP endpoint and real-time Kafka tagging (the ``ray`` extra).

- :mod:`serve.app`: the application builder (``serve.app:build_app``) wiring the graph.
- :mod:`serve.deployments`: Fusion (HTTP API, encoder, head), Scorer, Labels, KafkaTagger.
- :mod:`serve.http`, :mod:`serve.schemas`: the FastAPI app and its models.
- :mod:`serve.kafka`: the tagger loop; :mod:`serve.dev_kafka`: the local broker for the demo and tests.
- :mod:`serve.settings`: the application's args; :mod:`serve.metrics`: Prometheus metrics.

Ray code lives here and in ``data_jobs/`` only; ``fusion/`` never imports it.
"""
