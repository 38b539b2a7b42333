"""Every labelfuse setting, as pydantic models, loadable from YAML or JSON.

Unknown keys are rejected (a typo must not silently fall back to a default) and
every validation error names the field, the value given and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusion.errors import ConfigError
from fusion.labels import LABEL_SEPARATOR

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
Backend = Literal["auto", "torch", "onnx", "onnx-int8"]
BACKENDS: tuple[str, ...] = get_args(Backend)  # encoder.backend's values, for command-line choices
# Which texts the LLMs are asked about: "auto" the model's cost gate (every text when it has none),
# "off" none (the encoder-only path answers), "all" every text. Here, not in fusion.head, so that the parts
# of the Serve app that run no model (Scorer, Labels, KafkaTagger) never import torch.
LLMMode = Literal["auto", "off", "all"]
LLM_MODES: tuple[str, ...] = get_args(LLMMode)


def gpu_possible() -> bool:
    """Whether torch could find a GPU in this process, asked without importing torch (which costs seconds of
    CPU): a GPU driver is loaded and CUDA_VISIBLE_DEVICES does not hide every device."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/kfd")  # NVIDIA, or AMD ROCm


def cache_home() -> Path:
    """Where labelfuse keeps what it makes or fetches on this machine: $LABELFUSE_CACHE_DIR or ~/.cache/labelfuse."""
    return Path(os.environ.get("LABELFUSE_CACHE_DIR") or Path.home() / ".cache" / "labelfuse")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LabelsConfig(_Strict):
    """The label space."""

    mode: Literal["multiclass", "multilabel"] = Field(
        "multiclass", description="multiclass: exactly one label per text; multilabel: any subset, empty allowed."
    )
    classes: list[str] | None = Field(
        None, description="Class names in output order. Default: the sorted labels seen in the training data."
    )
    descriptions: dict[str, str] | None = Field(
        None,
        description="A one-line description per class, told to the LLMs with the class names (e.g. when a model "
        "starts from class names alone, `labelfuse bootstrap`).",
    )
    label_separator: str | None = Field(
        LABEL_SEPARATOR,
        description="Multilabel only: a string label cell is a list of labels joined by this separator, as "
        "`labelfuse predict` writes them to CSV; null: each string cell is one label.",
    )

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if len(v) < 1:
                raise ValueError("must list at least one class")
            dup = sorted({c for c in v if v.count(c) > 1})
            if dup:
                raise ValueError(f"duplicate class names: {dup}")
        return v


class FineTuneConfig(_Strict):
    """How the encoder is fine-tuned (``encoder.fine_tune``): steps, not the head's epochs, set its pace."""

    max_epochs: int = Field(
        10, ge=1, description="Upper bound on passes over the training rows; early stopping usually ends sooner."
    )
    batch_size: int = Field(16, ge=1, description="Rows per optimiser step.")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Optimiser steps between validation checks. Default: four checks per epoch, but at most one "
        "per validation set's worth of training rows (a check costs about a third of training on as many rows).",
    )
    patience: int = Field(
        4, ge=1, description="Validation checks without improvement before stopping; the best weights are restored."
    )
    warmup_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of the steps over which the encoder's learning rate warms up "
        "from 0; it then decays linearly to 0.",
    )
    features: Literal["crossfit", "holdout"] = Field(
        "crossfit",
        description="two-stage: how the fusion head gets encoder logits for rows the encoder did not train on. "
        "'crossfit': from `folds` encoders, each fine-tuned without one fold, then one on all rows for "
        "prediction; 'holdout': one encoder fine-tuned without `holdout_fraction` of the rows, on which the head "
        "trains.",
    )
    auto_min_rows: int = Field(
        150,
        ge=1,
        description="fine_tune 'auto' fine-tunes from this many training rows up. Measured: fine-tuning lost 5 points "
        "of subset accuracy at 49 and 99 rows of bbc-news-multilabel and gained 8 at 193 "
        "(docs/fine-tuning.md).",
    )
    folds: int = Field(3, ge=2, le=10, description="crossfit: number of folds.")
    holdout_fraction: float = Field(0.3, gt=0.0, lt=0.9, description="holdout: share of rows kept for the head.")


class EncoderConfig(_Strict):
    """The transformer text encoder."""

    model: str = Field(
        DEFAULT_ENCODER,
        description="'all-MiniLM-L6-v2' (bundled, offline), a local Hugging Face model dir, or a hub name you have cached.",
    )
    max_length: int = Field(256, ge=8, le=8192, description="Tokens kept per text (longer texts are truncated).")
    batch_size: int = Field(32, ge=1, le=4096, description="Texts per forward pass.")
    pooling: Literal["mean", "cls"] = Field("mean", description="How token vectors become one text vector.")
    normalize: bool = Field(True, description="L2-normalise embeddings.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    num_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads the encoder runs (PyTorch's for this process, or ONNX Runtime's). Default: "
        "PyTorch's own setting; ONNX Runtime takes PyTorch's where the process has loaded it, else "
        "OMP_NUM_THREADS, else every CPU the process may use.",
    )
    backend: Backend = Field(
        "auto",
        description="'auto': 'onnx' where the encoder runs on the CPU and its weights are not being fine-tuned, "
        "else 'torch' (falling back to 'torch' when the encoder cannot be exported). 'torch': PyTorch, on CPU or "
        "GPU, fine-tunable. 'onnx': the transformer in ONNX Runtime, float32, CPU only: PyTorch's embeddings "
        "(cosine >= 0.9999), and a process that embeds loads neither torch nor transformers (MiniLM, loaded and "
        "one text embedded in a fresh process: 1.0 CPU-s and 208 MB instead of 8.1 CPU-s and 452 MB). 'onnx-int8': the same with int8 weights, refused unless "
        "cosine >= 0.95; on 2 AVX2 cores with MiniLM 1.65-1.8x the texts/s of 'torch' (3.4x with AVX-512), the same accuracy "
        "(docs/scaling.md). ONNX exports are made once per machine into $LABELFUSE_CACHE_DIR/onnx.",
    )
    fine_tune: Literal["auto", "off", "joint", "two-stage"] = Field(
        "auto",
        description="'auto': 'two-stage' when the encoder runs on a CUDA GPU, fit gets at least "
        "fine_tuning.auto_min_rows texts (not precomputed embeddings) and no LLM has few_shot; 'off' otherwise, "
        "e.g. on CPU, where fine-tuning costs minutes per hundred rows (docs/fine-tuning.md). 'off': a frozen "
        "encoder. 'two-stage': fine-tune the encoder as a classifier, then train the fusion head on its logits for "
        "rows it did not train on (see encoder.fine_tuning.features), so the head learns how far to trust it "
        "against the LLMs. 'joint': train the encoder with the fusion head (true = 'joint').",
    )
    fine_tune_lr: float = Field(2e-5, gt=0, description="Learning rate for encoder weights when fine_tune is on.")
    fine_tuning: FineTuneConfig = Field(
        default_factory=FineTuneConfig, description="Schedule and early stopping when fine_tune is on."
    )

    @field_validator("fine_tune", mode="before")
    @classmethod
    def _fine_tune_bool(cls, v: Any) -> Any:
        return {True: "joint", False: "off"}.get(v, v) if isinstance(v, bool) else v

    def resolved_fine_tune(self) -> Literal["off", "joint", "two-stage"]:
        """``fine_tune`` with 'auto' decided by the device: 'two-stage' on a CUDA GPU, else 'off'. (``fit``
        also turns 'auto' off below ``fine_tuning.auto_min_rows``, for precomputed embeddings and few-shot.)"""
        if self.fine_tune != "auto":
            return self.fine_tune
        if self.backend in ("onnx", "onnx-int8") or self.on_cpu():
            return "off"
        return "two-stage" if self.device.startswith("cuda") or self.device == "auto" else "off"

    def on_cpu(self) -> bool:
        """The encoder runs on the CPU: ``device`` 'cpu', or 'auto' where torch finds no CUDA GPU."""
        if self.device != "auto":
            return self.device == "cpu"
        if not gpu_possible():
            return True
        import torch

        return not torch.cuda.is_available()

    def resolved_backend(self, fine_tuning: bool) -> Literal["torch", "onnx", "onnx-int8"]:
        """``backend`` with 'auto' decided: 'onnx' on the CPU unless ``fine_tuning`` (the weights train here)."""
        if self.backend != "auto":
            return self.backend
        return "onnx" if not fine_tuning and self.on_cpu() else "torch"

    @property
    def fine_tuned(self) -> bool:
        """The encoder's weights may train here: callers give ``fit`` texts, not precomputed embeddings."""
        return self.resolved_fine_tune() != "off"

    def on(self, device: str) -> EncoderConfig:
        """This encoder on ``device`` (a load-time override); :class:`ConfigError` where it cannot run there."""
        try:
            return EncoderConfig.model_validate({**self.model_dump(), "device": device})
        except ValidationError as err:
            raise ConfigError(f"encoder.device {device!r}: {err.errors()[0]['msg']}") from None

    @model_validator(mode="after")
    def _onnx_on_cpu(self) -> EncoderConfig:
        if self.backend in ("onnx", "onnx-int8"):
            if self.device not in ("auto", "cpu"):
                raise ValueError(
                    f"backend {self.backend!r} runs on the CPU; device {self.device!r} needs backend 'torch' or 'auto'"
                )
            if self.fine_tune in ("joint", "two-stage"):
                raise ValueError(
                    f"backend {self.backend!r} does not fine-tune; use fine_tune 'off' (or 'auto'), or backend "
                    f"'torch' or 'auto' for fine_tune {self.fine_tune!r}"
                )
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError(f"got {v!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
        return v


class LLMScorerConfig(_Strict):
    """One LLM whose per-class scores are fused (see fusion.llm)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Unique name; keys this LLM's score block.")
    provider: Literal["openai", "deepseek", "gemini", "vllm", "ollama", "custom", "local"] = Field(
        description="Endpoint preset; 'local' runs a GGUF model in-process (offline)."
    )
    model: str = Field(
        description="Model name at the provider; for 'local' a bundled model name (see `labelfuse llm-models`) "
        "or a GGUF file path."
    )
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint; default from the provider preset.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key; default from the preset (e.g. OPENAI_API_KEY)."
    )
    mode: Literal["auto", "logprobs", "json"] = Field(
        "auto",
        description="auto: first-token logprobs for multiclass, JSON for multilabel (and when an endpoint gives "
        "no logprobs); json: one probability per class in a validated JSON answer.",
    )
    max_words: int = Field(
        60,
        ge=8,
        description="Words of each text sent to the LLM, and at most 10 characters per word (texts without "
        "spaces, e.g. Chinese, are cut too): bounds cost and latency.",
    )
    few_shot: int = Field(0, ge=0, le=32, description="Nearest training examples (by encoder embedding) in the prompt.")
    price_input: float | None = Field(
        None, ge=0, description="$ per 1M prompt tokens; default from the built-in price table (0 for local)."
    )
    price_output: float | None = Field(None, ge=0, description="$ per 1M completion tokens; default as price_input.")
    json_max_tokens: int = Field(0, ge=0, description="Completion-token cap for a JSON answer; 0 = 12 per class + 16.")


class LLMLimitsConfig(_Strict):
    """Spend and rate limits shared by every configured LLM (one ledger)."""

    budget_usd: float | None = Field(
        None, ge=0, description="Dollar cap for LLM calls per run (reserved before each call); None = no cap."
    )
    max_concurrency: int = Field(8, ge=1, description="LLM calls in flight at once.")
    ledger_journal: str | None = Field(
        None,
        description="SQLite file journaling the ledger's spend and open reservations, so a restarted ledger resumes "
        "(never from $0). Default: the shared Ray ledger uses $LABELFUSE_CACHE_DIR/ledgers/<name>.sqlite on the head "
        "node, an in-process ledger keeps spend for its process only. 'memory': no journal.",
    )
    reservation_timeout_s: float = Field(
        900.0,
        gt=0,
        description="A reservation not settled after this long (its caller died) is charged its reserved worst case "
        "and released; a late settle replaces the charge with the real cost.",
    )
    requests_per_minute: float | None = Field(None, gt=0, description="Request rate cap; None = none.")
    tokens_per_minute: float | None = Field(None, gt=0, description="Token rate cap (prompt + completion).")
    max_retries: int = Field(4, ge=0, description="Retries on 429, 5xx, timeouts and connection errors.")
    retry_base_s: float = Field(0.5, gt=0, description="First backoff delay; doubles per retry, with jitter.")
    retry_max_s: float = Field(
        30.0, gt=0, description="Longest single backoff delay (Retry-After is honoured up to this)."
    )
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    cache: bool = Field(True, description="Cache LLM scores in SQLite; a re-run of the same texts makes no calls.")
    cache_path: str | None = Field(
        None, description="Cache file; default $LABELFUSE_CACHE_DIR or ~/.cache/labelfuse, file llm_cache.sqlite."
    )


class GatingConfig(_Strict):
    """Cost gating: call the LLMs only for texts the encoder-only path is unsure about."""

    enabled: bool = Field(False, description="Gate LLM calls at prediction time.")
    target_call_rate: float = Field(
        0.3, gt=0, le=1, description="Share of validation texts that should get LLM calls; sets the threshold."
    )
    target_accuracy: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Instead of target_call_rate: the lowest validation call rate (0, 5, 10, 20 ... 100%) whose "
        "accuracy (subset accuracy for multilabel) reaches this; when none does, the lowest within a point of the "
        "best.",
    )
    min_call_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Ask the LLMs about at least this share of validation texts (the least sure ones), whatever the "
        "target: a model that keeps learning from the LLM's answers (the learning loop) keeps getting new ones.",
    )


class FusionConfig(_Strict):
    """The fusion MLP over [embedding | LLM score blocks | LLM missing flags]."""

    hidden_dims: list[int] = Field([256], description="Hidden layer widths; [] gives a linear model.")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout after each hidden layer.")
    llm_dropout: float = Field(
        0.3, ge=0.0, le=1.0, description="Training-time chance of hiding each LLM block (teaches the missing-LLM path)."
    )

    @field_validator("hidden_dims")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v):
            raise ValueError(f"every width must be >= 1, got {v}")
        return v


class TrainConfig(_Strict):
    """Optimisation, early stopping and calibration."""

    max_epochs: int = Field(200, ge=1, description="Upper bound on epochs; early stopping usually ends sooner.")
    batch_size: int = Field(64, ge=1, description="Rows per optimiser step.")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate for the fusion head.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    patience: int = Field(15, ge=1, description="Epochs without validation-loss improvement before stopping.")
    val_fraction: float = Field(
        0.15, gt=0.0, lt=0.9, description="Share of training rows held out for validation when none is given."
    )
    seed: int = Field(42, description="Seed for splits, initialisation, shuffling and dropout.")
    llm_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Share of training and validation rows sent to the LLMs (stratified sample); the rest train "
        "with the LLM-missing flag, as gated-off texts are predicted. Bounds training-time LLM spend.",
    )
    calibrate: bool = Field(True, description="Fit temperature scaling (and multilabel thresholds) on validation data.")


class DataConfig(_Strict):
    """Where the text and labels are in a table."""

    text_column: str = Field("text", description="Column holding the text.")
    label_column: str | None = Field(
        "label", description="Column holding a label string, or a list of labels (multilabel), per row."
    )
    label_columns: list[str] | None = Field(
        None, description="Alternative to label_column: one 0/1 column per class (its name is the class name)."
    )

    @model_validator(mode="after")
    def _one_label_source(self) -> DataConfig:
        if self.label_columns is not None:
            if len(self.label_columns) == 0:
                raise ValueError("label_columns must name at least one column")
            if "label_column" in self.model_fields_set and self.label_column is not None:
                raise ValueError("set either label_column or label_columns, not both")
            object.__setattr__(self, "label_column", None)
        return self


class Config(_Strict):
    """The whole labelfuse configuration."""

    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    llms: list[LLMScorerConfig] = Field(default_factory=list, description="LLM scorers to fuse; [] = encoder only.")
    llm_limits: LLMLimitsConfig = Field(default_factory=LLMLimitsConfig)
    gating: GatingConfig = Field(default_factory=GatingConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    @field_validator("llms")
    @classmethod
    def _unique_llm_names(cls, v: list[LLMScorerConfig]) -> list[LLMScorerConfig]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"LLM scorer names must be unique; repeated: {dup}")
        return v


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at the parent of ``loc`` (for 'did you mean' hints)."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return list(model.model_fields) if model is not None else []


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = [f"invalid {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(loc)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = "unknown field" + (f"; did you mean '{hint[0]}'?" if hint else "")
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})"
        else:
            msg = e["msg"]
            if "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any] | None, source: str = "config") -> Config:
    """Validate a plain dict into a :class:`Config`, raising :class:`ConfigError` on problems."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path) -> Config:
    """Read a YAML (``.yaml``/``.yml``) or JSON (``.json``) config file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot parse {p}: {err}") from None
    return parse_config(data, source=f"config {p}")


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` overrides (values parsed as YAML scalars/lists)."""
    data = config.model_dump()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.field=value, e.g. train.seed=7")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a config section")
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse value: {err}") from None
    return parse_config(data, source="config overrides")


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(), sort_keys=False)
