"""labelfuse's core library: encoder + LLM score fusion for text classification.

Plain Python and torch; no Ray. ``serve/`` and ``data_jobs/`` build on it.
Heavy modules load on first use, so ``import fusion`` stays cheap.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["AutoFusionClassifier", "Config", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "AutoFusionClassifier":
        from fusion.classifier import AutoFusionClassifier

        return AutoFusionClassifier
    if name == "Config":
        from fusion.config import Config

        return Config
    raise AttributeError(f"module 'fusion' has no attribute {name!r}")
