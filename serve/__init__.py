"""Ray Serve application for labelfuse (HTTP endpoint and Kafka stream tagging).

Not implemented yet: see the Ray Serve issue in the tracker. Ray code lives here and
in ``data_jobs/`` only; ``fusion/`` never imports it.
"""
