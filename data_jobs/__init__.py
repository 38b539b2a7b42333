"""Ray Data batch jobs for labelfuse (embedding, LLM scoring, backfills via ``ray job submit``).

Not implemented yet: see the Ray Data issue in the tracker. Ray code lives here and in
``serve/`` only; ``fusion/`` never imports it.
"""
