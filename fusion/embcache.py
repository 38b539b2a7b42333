"""The embeddings a registry's retrains computed, so the next retrain embeds only the texts it has not seen.

```
registry/embeddings/<encoder key>/<time>-<rows>-<random>.npz    ids (text ids) and emb (float32)
```

Every retrain trains on the whole label store and judges on its held-out slice, so without a cache its
encoder cost grows with the store, not with what changed since the last one. The encoder key hashes what
decides an embedding (:meth:`TextEncoder.reference`: the model, max_length, pooling, normalisation, int8 or
not; and the model's weight, config and tokenizer files), so a changed encoder starts a new directory and
never reads another's vectors; the device, batch size and threads are left out. Each retrain writes the
vectors it computed as one shard (written whole, then renamed into place), and the oldest shards are
removed once the directory holds more than ``max_rows`` rows (about 1.5 KB a row for a 384-wide encoder).
A shard that cannot be read, or whose rows do not fit the encoder, is logged and removed; its texts are
embedded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion.texts import text_id

log = logging.getLogger(__name__)

SHARD = re.compile(r"\d{20}-(\d+)-[0-9a-f]{8}\.npz")  # <time_ns>-<rows>-<random>.npz


def encoder_key(encoder: Any) -> str:
    """What decides the encoder's vectors, hashed: its reference (model, length, pooling, ...) and its files."""
    from fusion.onnx_encoder import model_files_digest

    ref = json.dumps(encoder.reference(), sort_keys=True)
    return hashlib.sha256(f"{ref}\0{model_files_digest(encoder.source)}".encode()).hexdigest()[:32]


class EmbeddingCache:
    """``cache(texts)``: ``encoder``'s vectors of ``texts``, read from the shards under ``root`` where it has them.

    ``stats`` counts the texts it found (``cached``) and those it gave the encoder (``embedded``)."""

    def __init__(self, root: str | os.PathLike[str], encoder: Any, max_rows: int):
        if max_rows < 1:
            raise ValueError(f"an embedding cache holds at least 1 row, got max_rows={max_rows}")
        self.encoder, self.max_rows = encoder, max_rows
        self.dir = Path(root) / encoder_key(encoder)
        self.stats = {"cached": 0, "embedded": 0}

    def __call__(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        ids = [text_id(t) for t in texts]
        found = self._read(set(ids))
        new = {i: t for i, t in zip(ids, texts, strict=True) if i not in found}
        if new:
            vectors = self.encoder.embed(list(new.values()), progress=progress)
            found.update(zip(new, vectors, strict=True))
            self._write(list(new), vectors)
        self.stats["cached"] += sum(i not in new for i in ids)
        self.stats["embedded"] += len(new)
        if not ids:
            return np.zeros((0, self.encoder.dim), np.float32)
        return np.stack([found[i] for i in ids])

    def _shards(self) -> list[tuple[Path, int]]:
        """(path, rows) of each shard, oldest first."""
        names = sorted(os.listdir(self.dir)) if self.dir.is_dir() else []
        return [(self.dir / n, int(m[1])) for n in names if (m := SHARD.fullmatch(n))]

    def _read(self, wanted: set[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for shard, _ in self._shards():
            if len(found) == len(wanted):
                break
            try:
                with np.load(shard, allow_pickle=False) as z:
                    ids, emb = z["ids"], z["emb"]
                if emb.dtype != np.float32 or emb.shape != (len(ids), self.encoder.dim):
                    raise ValueError(f"{emb.dtype} rows of shape {emb.shape} for {len(ids)} ids")
            except FileNotFoundError:  # removed by another retrain since it was listed
                continue
            except Exception as err:  # a damaged shard costs its texts' embeddings, nothing else
                log.warning("embedding cache: removing %s, which cannot be used (%s)", shard, err)
                shard.unlink(missing_ok=True)
                continue
            hit = np.flatnonzero(np.isin(ids, list(wanted)))
            found.update(zip(ids[hit].tolist(), emb[hit], strict=True))  # copies the rows, not the shard
        return found

    def _write(self, ids: list[str], vectors: np.ndarray) -> None:
        ids, vectors = ids[-self.max_rows :], vectors[-self.max_rows :]
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{len(ids)}-{uuid.uuid4().hex[:8]}.npz"
        tmp = self.dir / f"{name}.part"  # never read: a reader sees a shard whole or not at all
        with tmp.open("wb") as f:
            np.savez(f, ids=np.array(ids), emb=vectors.astype(np.float32, copy=False))
        os.replace(tmp, self.dir / name)
        shards = self._shards()
        rows = sum(n for _, n in shards)
        for old, n in shards[:-1]:  # oldest first; the newest stays
            if rows <= self.max_rows:
                break
            old.unlink(missing_ok=True)
            rows -= n
