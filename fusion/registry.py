"""The model registry: every bundle by version, the champion that serves, and every promotion decision.

```
registry/
  registry.json          {"champion": version, "lineage": [older champions .., champion], "history": [events]}
  bundles/<version>/     a copy of each registered bundle (kept: a rollback needs the previous ones)
  reports/<time>-<version>.json   one report per promotion decision
  embeddings/<encoder key>/       the texts' vectors retrains computed (fusion.embcache)
```

The Serve app follows a registry when its ``bundle`` is one (:func:`resolve_bundle`): each
Fusion replica checks ``registry.json`` every few seconds and rolls the new champion out
the way a new ``user_config`` bundle rolls out, so a promotion or a rollback reaches the
serving answers without a redeploy. ``registry.json`` is replaced atomically under a lock,
so concurrent retrain jobs and a rollback never lose each other's changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fusion.bundle import MANIFEST, Bundle
from fusion.errors import BundleError, ConfigError
from fusion.remote import is_uri

STATE = "registry.json"


def is_registry(path: str | os.PathLike[str]) -> bool:
    return not is_uri(path) and (Path(path) / STATE).is_file()


def resolve_bundle(path: str | os.PathLike[str]) -> str | Path:
    """A bundle directory or URI as it is, or a (local) registry's champion bundle."""
    if not is_registry(path):
        return str(path) if is_uri(path) else Path(path)
    p = Path(path)
    reg = Registry(p)
    champion = reg.champion()
    if champion is None:
        raise ConfigError(f"registry {p} has no champion yet: promote a bundle with `labelfuse registry promote`")
    return reg.bundle_path(champion)


class Registry:
    """Bundles by version under ``root`` (created on first use); see the module docstring."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"model registry {self.root} is a file: give a directory")

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # -- state ----------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / STATE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"champion": None, "lineage": [], "history": []}
        except ValueError as err:  # written atomically by this class: someone else's edit
            raise ConfigError(f"model registry {self.root}: {STATE} is not valid JSON ({err})") from None

    @contextlib.contextmanager
    def _update(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of registry.json under an exclusive lock; written atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.state()
            yield state
            tmp = self.root / f".{STATE}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
            os.replace(tmp, self.root / STATE)

    def champion(self) -> str | None:
        return self.state()["champion"]

    def champion_path(self) -> Path | None:
        v = self.champion()
        return None if v is None else self.bundle_path(v)

    def bundle_path(self, version: str) -> Path:
        path = self.root / "bundles" / version
        if not (path / MANIFEST).is_file():
            raise BundleError(f"registry {self.root} has no bundle {version!r}")
        return path

    def versions(self) -> list[str]:
        d = self.root / "bundles"
        return sorted(p.name for p in d.iterdir() if (p / MANIFEST).is_file()) if d.is_dir() else []

    # -- changes --------------------------------------------------------------------------------------------
    def register(self, bundle: str | os.PathLike[str]) -> str:
        """Copy a bundle in (once per version); returns its version."""
        version = Bundle.open(Path(bundle)).version
        target = self.root / "bundles" / version
        if not (target / MANIFEST).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{version}.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(bundle, tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # another writer registered the same version first
                shutil.rmtree(tmp, ignore_errors=True)
        return version

    def _record(self, state: dict[str, Any], event: str, version: str | None, report: dict[str, Any] | None) -> dict:
        entry: dict[str, Any] = {"at": time.time(), "event": event, "version": version, "champion": state["champion"]}
        if report is not None:
            reports = self.root / "reports"
            reports.mkdir(parents=True, exist_ok=True)
            name = f"{time.strftime('%Y%m%dT%H%M%S')}-{event}-{version}.json"
            (reports / name).write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
            entry["report"] = f"reports/{name}"
        state["history"].append(entry)
        return entry

    def promote(self, version: str, report: dict[str, Any] | None = None) -> dict[str, Any]:
        """Make ``version`` (registered) the champion; the one before stays in the lineage for a rollback."""
        self.bundle_path(version)
        with self._update() as state:
            if state["champion"] != version:
                state["lineage"] = [v for v in state["lineage"] if v != version] + [version]
                state["champion"] = version
            return self._record(state, "promote", version, report)

    def refuse(self, version: str, report: dict[str, Any]) -> dict[str, Any]:
        """Record a challenger that was not promoted, with the report saying why."""
        with self._update() as state:
            return self._record(state, "refuse", version, report)

    def rollback(self) -> str:
        """Make the previous champion the champion again; returns its version."""
        with self._update() as state:
            if len(state["lineage"]) < 2:
                raise ConfigError(f"registry {self.root} has no earlier champion to roll back to")
            gone = state["lineage"].pop()
            state["champion"] = state["lineage"][-1]
            self._record(state, "rollback", state["champion"], {"rolled_back": gone, "champion": state["champion"]})
            return state["champion"]
