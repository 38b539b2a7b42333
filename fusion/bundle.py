"""The on-disk model bundle: a directory with a JSON manifest and safetensors weights.

```
model/
  manifest.json        format + version, label space, feature layout, encoder reference,
                       temperature, thresholds, config, metrics, sha256 of every other file
  head.safetensors     fusion MLP weights and the feature scaler (scaler.mean, scaler.std)
  encoder/             only when the encoder was fine-tuned: its weights and tokenizer
```

:class:`Bundle` opens one and loads each part of the model alone: the encoder, the fusion
head, the few-shot example pool and the LLM panel, so a process that runs one part never
loads the others. A bundle is written to a temporary sibling directory and renamed into place, so a
crash never leaves a half-written bundle under the final name. Loading checks the
format version and every checksum before any tensor is read, and raises
:class:`BundleError` with what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fusion.errors import BundleError
from fusion.remote import MANIFEST, local_bundle, sha256_file

if TYPE_CHECKING:
    from fusion.config import Config
    from fusion.encoder import TextEncoder
    from fusion.fewshot import ExamplePool
    from fusion.head import FusionHead
    from fusion.llm import Ledger, LLMPanel

log = logging.getLogger(__name__)

FORMAT = "labelfuse-bundle"
FORMAT_VERSION = 1
HEAD_FILE = "head.safetensors"
ENCODER_DIR = "encoder"


@dataclass
class BundleContents:
    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray]  # read without torch: the Scorer and Labels replicas never import it
    encoder_dir: Path | None


def check_destination(path: str | Path) -> None:
    """Refuse, before any work, a bundle path that :func:`write_bundle` would refuse after it: a file, or a
    directory with other things in it."""
    final = Path(path)
    if final.exists() and (not final.is_dir() or (not (final / MANIFEST).is_file() and any(final.iterdir()))):
        raise BundleError(f"refusing to overwrite {final}: it exists and is not a labelfuse bundle")


def write_bundle(
    path: str | Path,
    manifest: dict[str, Any],
    tensors: dict[str, np.ndarray],
    save_encoder: Callable[[Path], None] | None = None,
) -> Path:
    """Write a bundle atomically. ``save_encoder(dir)`` writes a fine-tuned encoder, if given."""
    from safetensors.numpy import save_file

    from fusion import __version__

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    check_destination(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / HEAD_FILE))
        if save_encoder is not None:
            save_encoder(tmp / ENCODER_DIR)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        full = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **manifest,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, default=_json_default), encoding="utf-8")
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def version_of(manifest: dict[str, Any]) -> str:
    """A short id of a bundle's content (its file checksums): equal bundles share it, any change alters it."""
    digest = hashlib.sha256(json.dumps(manifest.get("files", {}), sort_keys=True).encode()).hexdigest()
    return digest[:12]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_bundle(path: str | Path) -> BundleContents:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from fusion import __version__

    root = local_bundle(path)  # a URI is fetched (and cached) first: see fusion.remote
    if not root.is_dir():
        raise BundleError(f"model bundle not found: {root} is not a directory")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not a labelfuse model bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{mpath} is corrupted (not valid JSON: {err}); re-save or re-train the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath} is not a labelfuse manifest (format is {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{root} uses bundle format {version} (written by labelfuse {manifest.get('library_version', '?')}); "
            f"this labelfuse {__version__} reads format {FORMAT_VERSION}. "
            "Load it with the labelfuse version that wrote it, or re-train."
        )
    if manifest.get("library_version") != __version__:
        log.warning(
            "bundle %s was written by labelfuse %s; this is %s (same bundle format, loading)",
            root,
            manifest.get("library_version"),
            __version__,
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or HEAD_FILE not in files:
        raise BundleError(f"{mpath} is corrupted: its file list is missing or lacks {HEAD_FILE}")
    for rel, digest in files.items():
        fp = root / rel
        if not fp.is_file():
            raise BundleError(f"{root} is incomplete: {rel} is missing; copy the whole bundle directory")
        if sha256_file(fp) != digest:
            raise BundleError(f"{root} is corrupted: {rel} does not match its checksum; re-copy or re-train")
    try:
        tensors = load_file(str(root / HEAD_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"{root / HEAD_FILE} cannot be read: {err}") from None
    enc = root / ENCODER_DIR
    return BundleContents(manifest, tensors, enc if any(k.startswith(ENCODER_DIR + "/") for k in files) else None)


PROBE_DIMS = 16  # leading dimensions of the probe text's embedding kept in the manifest


class Bundle:
    """An opened bundle (format and checksums verified); each part of the model loads alone.

    ``Bundle.open(path).head()`` gives the fusion head without loading the encoder;
    :meth:`encoder`, :meth:`pool` and :meth:`panel` likewise. Every inconsistency between the
    manifest and the weights is a :class:`BundleError`.
    """

    def __init__(self, path: str | Path, contents: BundleContents):
        self.path = str(path)
        self.manifest = contents.manifest
        self.tensors = contents.tensors
        self.encoder_dir = contents.encoder_dir

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        return cls(path, read_bundle(path))

    @cached_property
    def version(self) -> str:
        return version_of(self.manifest)

    @cached_property
    def config(self) -> Config:
        from fusion.config import parse_config

        return parse_config(self.manifest["config"], source=f"config stored in {self.path}")

    @property
    def fine_tuned(self) -> bool:
        """The encoder was fine-tuned: its weights are inside this bundle."""
        return self.encoder_dir is not None

    @property
    def encoder_reference(self) -> dict[str, Any]:
        """model, dim, max_length, pooling, normalize of the encoder (``TextEncoder.reference``)."""
        return {k: v for k, v in self.manifest["encoder"].items() if k not in ("probe", "embedded")}

    @property
    def encoder_key(self) -> str:
        """The identity of this bundle's encoder: a stock encoder is shared by every bundle that names it."""
        return f"{self.path}@{self.version}" if self.fine_tuned else json.dumps(self.encoder_reference, sort_keys=True)

    @contextmanager
    def _consistent(self) -> Iterator[None]:
        try:
            yield
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise BundleError(
                f"{self.path} has an inconsistent manifest or weights ({type(err).__name__}: {err})"
            ) from None

    def head(self) -> FusionHead:
        from fusion.head import FusionHead

        with self._consistent():
            return FusionHead.from_bundle(self.manifest, self.tensors)

    def pool(self) -> ExamplePool | None:
        from fusion.fewshot import ExamplePool

        with self._consistent():
            return ExamplePool.from_bundle(self.manifest.get("fewshot"), self.tensors)

    def panel(self, ledger: Ledger | None = None) -> LLMPanel:
        """The LLM scorers of this bundle, with its few-shot pool; ``ledger`` as in :class:`LLMPanel`."""
        from fusion.llm import LLMPanel

        with self._consistent():
            space = self.manifest["label_space"]
            classes, multilabel = list(space["classes"]), bool(space["multilabel"])
        cfg = self.config
        return LLMPanel(
            cfg.llms,
            classes,
            multilabel,
            cfg.llm_limits,
            ledger=ledger,
            pool=self.pool(),
            descriptions=cfg.labels.descriptions,
        )

    def encoder(
        self, device: str | None = None, encoder: TextEncoder | None = None, threads: int | None = None
    ) -> TextEncoder:
        """The encoder this bundle was trained with (checked on a probe text); ``device`` overrides
        ``encoder.device``, ``threads`` its ``num_threads``; ``encoder``: use this one instead (it is checked
        the same way)."""
        import numpy as np

        from fusion.encoder import TextEncoder
        from fusion.texts import PROBE_TEXT

        if encoder is None:
            cfg = self.config.encoder if device is None else self.config.encoder.on(device)
            if threads is not None:
                cfg = cfg.model_copy(update={"num_threads": threads})
            model_dir = str(self.encoder_dir) if self.encoder_dir is not None else None
            encoder = TextEncoder(cfg, model_dir=model_dir)
        with self._consistent():
            ref, dim = self.manifest["encoder"], int(self.manifest["layout"]["embed_dim"])
            expected = np.asarray(ref["probe"], np.float32)
        if encoder.dim != dim:
            raise BundleError(f"encoder {ref['model']!r} gives {encoder.dim}-d embeddings; the model needs {dim}")
        probe = encoder.embed([PROBE_TEXT])[0, :PROBE_DIMS]
        if not np.allclose(probe, expected, atol=1e-2):
            raise BundleError(
                f"encoder {ref['model']!r} ({encoder.source}) gives different embeddings than the one this model "
                "was trained with; load it with the same encoder"
            )
        return encoder
