"""LLM scorers: per-class scores from OpenAI-compatible endpoints and a local offline model.

* :mod:`fusion.llm.scorer`: :class:`LLMScorer` (one LLM) and :class:`LLMPanel` (all of them).
* :mod:`fusion.llm.prompts`: versioned templates; logprobs and JSON answers to scores.
* :mod:`fusion.llm.providers`: presets, API keys, prices.
* :mod:`fusion.llm.local`: bundled GGUF models served in-process by llama.cpp.
* :mod:`fusion.llm.cache`: SQLite score cache. :mod:`fusion.llm.ledger`: budget and rate limits.
"""

from fusion.llm.ledger import Denial, Grant, Ledger, LocalLedger
from fusion.llm.scorer import LLMPanel, LLMScorer, ScoreBatch, UsageStats

__all__ = ["Denial", "Grant", "LLMPanel", "LLMScorer", "Ledger", "LocalLedger", "ScoreBatch", "UsageStats"]
