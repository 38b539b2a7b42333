"""The on-disk model bundle: a directory with a JSON manifest and safetensors weights.

```
model/
  manifest.json        format + version, label space, feature layout, encoder reference,
                       temperature, thresholds, config, metrics, sha256 of every other file
  head.safetensors     fusion MLP weights and the feature scaler (scaler.mean, scaler.std)
  encoder/             only when the encoder was fine-tuned: its weights and tokenizer
```

A bundle is written to a temporary sibling directory and renamed into place, so a
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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion.errors import BundleError

log = logging.getLogger(__name__)

FORMAT = "labelfuse-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"
ENCODER_DIR = "encoder"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class BundleContents:
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    encoder_dir: Path | None


def write_bundle(
    path: str | Path,
    manifest: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    save_encoder: Any = None,
) -> Path:
    """Write a bundle atomically. ``save_encoder(dir)`` writes a fine-tuned encoder, if given."""
    from safetensors.torch import save_file

    from fusion import __version__

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not (final / MANIFEST).is_file() and any(final.iterdir()):
        raise BundleError(f"refusing to overwrite {final}: it exists and is not a labelfuse bundle")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / HEAD_FILE))
        if save_encoder is not None:
            save_encoder(tmp / ENCODER_DIR)
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
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
    from safetensors.torch import load_file

    from fusion import __version__

    root = Path(path)
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
        if _sha256(fp) != digest:
            raise BundleError(f"{root} is corrupted: {rel} does not match its checksum; re-copy or re-train")
    try:
        tensors = load_file(str(root / HEAD_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"{root / HEAD_FILE} cannot be read: {err}") from None
    enc = root / ENCODER_DIR
    return BundleContents(manifest, tensors, enc if any(k.startswith(ENCODER_DIR + "/") for k in files) else None)
