"""Provider presets, API keys and prices for OpenAI-compatible endpoints.

Every provider is reached through the ``openai`` package's async client; a preset only
fills in the base URL, the environment variable holding the key and the price table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fusion.config import LLMScorerConfig
from fusion.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    base_url: str | None
    api_key_env: str | None  # None: the endpoint needs no key unless api_key_env is configured


PRESETS: dict[str, Preset] = {
    "openai": Preset("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "deepseek": Preset("https://api.deepseek.com/v1", "DEEPSEEK_API_KEY"),
    "gemini": Preset("https://generativelanguage.googleapis.com/v1beta/openai/", "GEMINI_API_KEY"),
    "vllm": Preset("http://localhost:8000/v1", None),
    "ollama": Preset("http://localhost:11434/v1", None),
    "custom": Preset(None, None),
    "local": Preset(None, None),  # an in-process llama.cpp server, see fusion.llm.local
}

# $ per 1M tokens (input, output), list prices when this table was written; override per
# scorer with price_input / price_output. Self-hosted endpoints cost 0 unless configured.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "deepseek-chat": (0.27, 1.10),
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-2.0-flash-lite": (0.075, 0.30),
    "gemini-2.5-flash": (0.30, 2.50),
}
PAID = {"openai", "deepseek", "gemini"}


@dataclass(frozen=True)
class Endpoint:
    base_url: str | None  # None for 'local' until its server starts
    api_key: str
    price_input: float  # $ per 1M prompt tokens
    price_output: float  # $ per 1M completion tokens

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_input + completion_tokens * self.price_output) / 1e6


def resolve_endpoint(cfg: LLMScorerConfig) -> Endpoint:
    """Base URL, API key and prices for one scorer; raises :class:`ConfigError` if a key or URL is missing."""
    preset = PRESETS[cfg.provider]
    base_url = cfg.base_url or preset.base_url
    if base_url is None and cfg.provider != "local":
        raise ConfigError(f"LLM {cfg.name!r}: provider {cfg.provider!r} needs base_url (an OpenAI-compatible /v1 URL)")
    key_env = cfg.api_key_env or preset.api_key_env
    if key_env:
        api_key = os.environ.get(key_env, "")
        if not api_key:
            raise ConfigError(
                f"LLM {cfg.name!r}: the API key environment variable {key_env} is not set; export it "
                f"(or point llms[].api_key_env at the variable that holds the key)"
            )
    else:
        api_key = "not-needed"  # self-hosted endpoints ignore it; the client requires a value
    listed = PRICES.get(cfg.model)
    if cfg.price_input is not None:
        price_in = cfg.price_input
        price_out = cfg.price_output if cfg.price_output is not None else cfg.price_input
    elif listed is not None and cfg.provider in PAID:
        price_in, price_out = listed
    elif cfg.provider in PAID:
        raise ConfigError(
            f"LLM {cfg.name!r}: no price known for model {cfg.model!r}; set llms[].price_input and "
            f"price_output ($ per 1M tokens) so spend can be tracked and budgeted"
        )
    else:
        price_in = price_out = 0.0
    return Endpoint(base_url, api_key, price_in, price_out)
