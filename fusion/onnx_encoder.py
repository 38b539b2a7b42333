"""The encoder in ONNX Runtime (``encoder.backend: onnx``, the CPU default, and ``onnx-int8``), run
without PyTorch or transformers: a process that embeds imports onnxruntime, tokenizers and numpy.

Recipe, run once per model and machine (with torch and transformers, which a training machine has):
1. export the Hugging Face model to ONNX with torch's TorchScript exporter, with eager attention so
   that ONNX Runtime's transformer optimizer recognises it;
2. fuse attention, layer norms and GELU (``onnxruntime.transformers.optimizer``);
3. ``onnx-int8`` only: quantise the weights of the matrix products and attention to int8 per output
   channel, their inputs dynamically (``onnxruntime.quantization.quantize_dynamic``); the embeddings
   stay float;
4. save transformers' own fast tokenizer (its ``tokenizers`` core, with the model's settings applied)
   beside the graph, with its padding token;
5. check it: that tokenizer alone must give transformers' token ids on :data:`CHECK_TEXTS`, and every
   pooled vector must have cosine ≥ :data:`MIN_COSINE` with the PyTorch encoder's, or the export is refused.

The result lives in ``$LABELFUSE_CACHE_DIR/onnx/<key>/`` (``model.onnx``, ``tokenizer.json`` and
``export.json`` with the check's figures), ``key`` hashing the weights, the tokenizer, the recipe and the
onnxruntime version, so an encoder is exported once (seconds for MiniLM) and later loads read two files.
Pooling, normalising and a fine-tuned encoder's classification layer stay in
:class:`fusion.encoder.TextEncoder`, in numpy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion.config import cache_home
from fusion.errors import EncoderError

log = logging.getLogger(__name__)

RECIPES = {
    "onnx": "torchscript-eager/ort-bert-optimizer/fp32/tokenizers/v2",
    "onnx-int8": "torchscript-eager/ort-bert-optimizer/dynamic-int8-per-channel-no-embeddings/tokenizers/v2",
}
# Cosine with PyTorch's pooled vectors. fp32: MiniLM min 0.99999976 on bbc-news (the graph is the same
# maths). int8: bbc-news articles min 0.990, mean 0.995; texts of 1 to 12 words min 0.980; the worst is a
# 1-word text padded in one batch with a long one (CHECK_TEXTS): 0.968.
MIN_COSINE = {"onnx": 0.9999, "onnx-int8": 0.95}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HASHED_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
CHECK_TEXTS = (
    "Stocks fell sharply on Monday as oil prices surged past $120 a barrel.",
    "The striker scored twice in the second half to win the cup final.",
    "A new phone with a foldable screen goes on sale next month.",
    "Parliament voted on the budget late last night after a long debate.",
    "ok",
    "The film, shot over three winters in the north, follows a family of fishermen whose village is slowly "
    "emptied by the closing of the cannery; critics praised its patience, its score and the lead actress, "
    "who learned the local dialect for the part and spent months on the boats before filming began.",
    "Ünïcödé, emoji 🎉, CJK 漢字 and a URL: https://example.com/a?b=c",
)

Pool = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (hidden, attention_mask) -> pooled vectors


def _require() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise EncoderError(
            "encoder.backend 'onnx' and 'onnx-int8' need ONNX Runtime: pip install onnxruntime (or use backend 'torch')"
        ) from None
    return onnxruntime


def model_files_digest(source: str) -> str | None:
    """Hash of a local model directory's weights, config and tokenizer files; None when it has no weights."""
    h = hashlib.sha256()
    found = False
    for name in HASHED_FILES:
        p = Path(source) / name
        if p.is_file():
            found = found or name in ("model.safetensors", "pytorch_model.bin")
            h.update(name.encode())
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest() if found else None


def cache_key(source: str, backend: str) -> str:
    """Hash of the model's weights, config and tokenizer, the export recipe and the onnxruntime version."""
    ort = _require()
    digest = model_files_digest(source)
    if digest is None:
        raise EncoderError(f"encoder.backend {backend!r} needs a local model directory with weights; {source} has none")
    return hashlib.sha256(f"{RECIPES[backend]}\0{ort.__version__}\0{digest}".encode()).hexdigest()[:32]


class OnnxTransformer:
    """An exported transformer and its tokenizer: :meth:`tokenize` texts, then ``__call__`` maps the padded
    arrays to the last hidden state; ``info`` is its export's record (recipe, fused operators, the check)."""

    def __init__(self, path: Path, num_threads: int, max_length: int):
        ort = _require()
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.info: dict[str, Any] = json.loads((path.parent / "export.json").read_text())
            self.tokenizer = Tokenizer.from_file(str(path.parent / "tokenizer.json"))
            self.tokenizer.enable_truncation(max_length)
            self.pad_id = int(self.info["pad_id"])
        except Exception as err:
            raise EncoderError(f"cannot load the ONNX encoder {path}: {err}") from None
        self.path = path
        self.inputs = [i.name for i in self.session.get_inputs()]

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens added, cut to the encoder's ``max_length`` (transformers' ids)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def pad(self, ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """The model's inputs for these token id lists, padded to the longest."""
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: batch[k] for k in self.inputs})[0]


def load_or_export(source: str, backend: str, num_threads: int, pool: Pool, max_length: int) -> OnnxTransformer:
    """The ``backend`` ('onnx' or 'onnx-int8') transformer of the model in ``source``, from the cache or
    exported (and checked) now. ``pool(hidden, attention_mask)`` is the encoder's pooling: the check compares
    pooled vectors of :data:`CHECK_TEXTS`, cut to ``max_length`` tokens."""
    from filelock import FileLock

    path = cache_home() / "onnx" / cache_key(source, backend) / "model.onnx"
    if path.is_file():
        try:
            return OnnxTransformer(path, num_threads, max_length)
        except EncoderError as err:
            log.warning("%s; exporting it again", err)
            shutil.rmtree(path.parent, ignore_errors=True)
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path.parent}.lock"):  # the processes starting on a node together export it once
        if not path.is_file():
            try:
                _export(source, backend, path, num_threads, pool, max_length)
            except EncoderError:
                raise
            except Exception as err:  # an architecture the exporter or the optimizer cannot take
                raise EncoderError(
                    f"cannot export the encoder in {source} to ONNX ({type(err).__name__}: {str(err)[:300]}); "
                    "use encoder.backend 'torch'"
                ) from err
    return OnnxTransformer(path, num_threads, max_length)


def _export(source: str, backend: str, path: Path, num_threads: int, pool: Pool, max_length: int) -> None:
    import warnings

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    log.info("exporting the encoder in %s to ONNX (%s, once per machine)", source, backend)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if not tokenizer.is_fast or tokenizer.pad_token_id is None:
        raise EncoderError(f"the encoder in {source} has no fast tokenizer with a padding token; use backend 'torch'")
    names = [n for n in INPUTS if n in tokenizer.model_input_names]
    model = AutoModel.from_pretrained(source, attn_implementation="eager").eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state

    check = tokenizer(list(CHECK_TEXTS), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():  # before the export, which leaves the model traced
        hidden = model(**{n: check[n] for n in names}).last_hidden_state
        ref = pool(hidden.numpy(), check["attention_mask"].numpy())
    sample = tokenizer(["a short text", "a somewhat longer text to export with"], padding=True, return_tensors="pt")
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent.parent))
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the tracer's notes on Python conditionals in transformers' masking
            torch.onnx.export(
                Hidden(),
                tuple(sample[n] for n in names),
                str(work / "exported.onnx"),
                dynamo=False,
                input_names=names,
                output_names=["hidden"],
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "hidden"]},
                opset_version=17,
            )
        optimized = optimize_model(
            str(work / "exported.onnx"),
            model_type="bert",
            num_heads=int(getattr(model.config, "num_attention_heads", 0)),
            hidden_size=int(getattr(model.config, "hidden_size", 0)),
        )
        if backend == "onnx-int8":
            optimized.save_model_to_file(str(work / "fused.onnx"))
            quantize_dynamic(
                str(work / "fused.onnx"),
                str(work / "model.onnx"),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Attention"],  # not the embeddings: short texts lose most there
                extra_options={"DefaultTensorType": 1},  # FLOAT, for outputs of the fused ops shape inference skips
            )
            (work / "fused.onnx").unlink()
        else:
            optimized.save_model_to_file(str(work / "model.onnx"))
        (work / "exported.onnx").unlink()
        core = tokenizer.backend_tokenizer  # transformers' own fast tokenizer, the model's settings applied
        core.no_truncation()
        core.no_padding()
        core.save(str(work / "tokenizer.json"))
        (work / "export.json").write_text(json.dumps({"pad_id": tokenizer.pad_token_id}))

        exported = OnnxTransformer(work / "model.onnx", num_threads, max_length)
        ids = exported.tokenize(CHECK_TEXTS)
        want = [row[mask == 1].tolist() for row, mask in zip(check["input_ids"], check["attention_mask"], strict=True)]
        if ids != want:
            raise EncoderError(f"the tokenizer of {source} does not run alone the way transformers runs it")
        batch = exported.pad(ids)
        got = pool(exported(batch), batch["attention_mask"])
        cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        if float(cos.min()) < MIN_COSINE[backend]:
            raise EncoderError(
                f"the {backend} export of {source} is too far from PyTorch (cosine {cos.min():.5f} < "
                f"{MIN_COSINE[backend]} on {CHECK_TEXTS[int(cos.argmin())][:40]!r}); use encoder.backend 'torch'"
            )
        info = {
            "recipe": RECIPES[backend],
            "source": source,
            "pad_id": tokenizer.pad_token_id,
            "fused": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v},
            "check": {"min_cosine": round(float(cos.min()), 7), "mean_cosine": round(float(cos.mean()), 7)},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (work / "export.json").write_text(json.dumps(info, indent=1))
        os.replace(work, path.parent)  # whole or not at all
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("ONNX encoder (%s) ready in %.1f s: %s (min cosine %.6f)", backend, info["seconds"], path, cos.min())
