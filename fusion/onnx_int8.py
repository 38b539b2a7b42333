"""The int8 CPU encoder (``encoder.backend: onnx-int8``): the transformer in ONNX Runtime, weights in int8.

Recipe, run once per model and machine:
1. export the Hugging Face model to ONNX with torch's TorchScript exporter, with eager attention so
   that ONNX Runtime's transformer optimizer recognises it;
2. fuse attention, layer norms and GELU (``onnxruntime.transformers.optimizer``);
3. quantise the weights of the matrix products and attention to int8 per output channel, their
   inputs dynamically (``onnxruntime.quantization.quantize_dynamic``); the embeddings stay float;
4. check it: on :data:`CHECK_TEXTS` every pooled vector must have cosine ≥ :data:`MIN_COSINE` with the
   PyTorch encoder's, or the export is refused.

The result lives in ``$LABELFUSE_CACHE_DIR/onnx/<key>/`` (``model.onnx`` and ``export.json`` with the
check's figures), ``key`` hashing the weights, the recipe and the onnxruntime version, so an encoder
is exported once (seconds for MiniLM) and later loads read one file. Only the transformer runs in
ONNX Runtime; tokenising, pooling and normalising stay in :class:`fusion.encoder.TextEncoder`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fusion.config import cache_home
from fusion.errors import EncoderError

log = logging.getLogger(__name__)

RECIPE = "torchscript-eager/ort-bert-optimizer/dynamic-int8-per-channel-no-embeddings/v1"
# MiniLM's int8 export, cosine with PyTorch: bbc-news articles min 0.990, mean 0.995; texts of 1 to 12
# words min 0.980; the worst is a 1-word text padded in one batch with a long one (CHECK_TEXTS): 0.968
MIN_COSINE = 0.95
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "config.json")
CHECK_TEXTS = (
    "Stocks fell sharply on Monday as oil prices surged past $120 a barrel.",
    "The striker scored twice in the second half to win the cup final.",
    "A new phone with a foldable screen goes on sale next month.",
    "Parliament voted on the budget late last night after a long debate.",
    "ok",
    "The film, shot over three winters in the north, follows a family of fishermen whose village is slowly "
    "emptied by the closing of the cannery; critics praised its patience, its score and the lead actress, "
    "who learned the local dialect for the part and spent months on the boats before filming began.",
)


def _require() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise EncoderError(
            "encoder.backend 'onnx-int8' needs ONNX Runtime: pip install 'labelfuse[onnx]' (or use backend 'torch')"
        ) from None
    return onnxruntime


def cache_key(source: str, tokenizer_inputs: list[str]) -> str:
    """Hash of the model's weights and config, the export recipe, its inputs and the onnxruntime version."""
    ort = _require()
    h = hashlib.sha256(f"{RECIPE}\0{ort.__version__}\0{','.join(tokenizer_inputs)}".encode())
    found = False
    for name in WEIGHT_FILES:
        p = Path(source) / name
        if p.is_file():
            found = True
            h.update(name.encode())
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    if not found:
        raise EncoderError(f"encoder.backend 'onnx-int8' needs a local model directory with weights; {source} has none")
    return h.hexdigest()[:32]


class Int8Transformer:
    """An exported, quantised transformer: ``__call__`` maps tokenizer arrays to the last hidden state;
    ``info`` is its export's record (recipe, fused operators, the check's cosines, seconds)."""

    def __init__(self, path: Path, num_threads: int):
        ort = _require()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.info: dict[str, Any] = json.loads((path.parent / "export.json").read_text())
        except Exception as err:
            raise EncoderError(f"cannot load the int8 encoder {path}: {err}") from None
        self.path = path
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: batch[k].astype(np.int64, copy=False) for k in self.inputs})[0]


def load_or_export(source: str, tokenizer: Any, num_threads: int, pool: Any, max_length: int) -> Int8Transformer:
    """The int8 transformer of the model in ``source``, from the cache or exported (and checked) now.

    ``pool(hidden, attention_mask)`` is the encoder's pooling (torch tensors in and out): the check
    compares pooled vectors of :data:`CHECK_TEXTS`, cut to ``max_length`` tokens.
    """
    names = [n for n in INPUTS if n in tokenizer.model_input_names]
    path = cache_home() / "onnx" / cache_key(source, names) / "model.onnx"
    if path.is_file():
        try:
            return Int8Transformer(path, num_threads)
        except EncoderError as err:
            log.warning("%s; exporting it again", err)
            shutil.rmtree(path.parent, ignore_errors=True)
    try:
        _export(source, tokenizer, names, path, num_threads, pool, max_length)
    except EncoderError:
        raise
    except Exception as err:  # an architecture the exporter or the optimizer cannot take
        raise EncoderError(
            f"cannot export the encoder in {source} to int8 ONNX ({type(err).__name__}: {str(err)[:300]}); "
            "use encoder.backend 'torch'"
        ) from err
    return Int8Transformer(path, num_threads)


def _export(
    source: str, tokenizer: Any, names: list[str], path: Path, num_threads: int, pool: Any, max_length: int
) -> None:
    import warnings

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel

    t0 = time.perf_counter()
    log.info("exporting the encoder in %s to int8 ONNX (once per machine)", source)
    model = AutoModel.from_pretrained(source, attn_implementation="eager").eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state

    check = tokenizer(list(CHECK_TEXTS), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():  # before the export, which leaves the model traced
        ref = pool(model(**{n: check[n] for n in names}).last_hidden_state, check["attention_mask"])
    sample = tokenizer(["a short text", "a somewhat longer text to export with"], padding=True, return_tensors="pt")
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent.parent))
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the tracer's notes on Python conditionals in transformers' masking
            torch.onnx.export(
                Hidden(),
                tuple(sample[n] for n in names),
                str(work / "fp32.onnx"),
                dynamo=False,
                input_names=names,
                output_names=["hidden"],
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "hidden"]},
                opset_version=17,
            )
        optimized = optimize_model(
            str(work / "fp32.onnx"),
            model_type="bert",
            num_heads=int(getattr(model.config, "num_attention_heads", 0)),
            hidden_size=int(getattr(model.config, "hidden_size", 0)),
        )
        optimized.save_model_to_file(str(work / "fused.onnx"))
        quantize_dynamic(
            str(work / "fused.onnx"),
            str(work / "model.onnx"),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Attention"],  # not the embeddings: short texts lose most there
            extra_options={"DefaultTensorType": 1},  # FLOAT, for outputs of the fused ops shape inference skips
        )
        for tmp in ("fp32.onnx", "fused.onnx"):
            (work / tmp).unlink()
        (work / "export.json").write_text("{}")
        int8 = Int8Transformer(work / "model.onnx", num_threads)
        got = pool(torch.from_numpy(int8({n: check[n].numpy() for n in names})), check["attention_mask"])
        cos = torch.nn.functional.cosine_similarity(ref, got).numpy()
        if float(cos.min()) < MIN_COSINE:
            raise EncoderError(
                f"the int8 export of {source} is too far from PyTorch (cosine {cos.min():.3f} < {MIN_COSINE} on "
                f"{CHECK_TEXTS[int(cos.argmin())][:40]!r}); use encoder.backend 'torch'"
            )
        info = {
            "recipe": RECIPE,
            "source": source,
            "fused": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v},
            "check": {"min_cosine": round(float(cos.min()), 5), "mean_cosine": round(float(cos.mean()), 5)},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (work / "export.json").write_text(json.dumps(info, indent=1))
        try:
            os.replace(work, path.parent)  # whole or not at all; a concurrent export may have won
        except OSError:
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("int8 encoder ready in %.1f s: %s (min cosine %.4f)", info["seconds"], path, cos.min())
