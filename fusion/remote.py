"""Bundles at URIs: open a model bundle from object storage or a model hub, and publish one there.

Everywhere a bundle directory is accepted (``AutoFusionClassifier.load``, ``Bundle.open``, the
CLI's ``--bundle``, the Ray jobs, the Serve app's ``bundle``), a URI works too:

* a local path or ``file:///abs/path``: used where it is;
* ``hf://owner/repo[@revision][/subdir]``: a Hugging Face Hub model repo at a branch, tag or
  commit, through ``huggingface_hub`` and its cache (``HF_HUB_OFFLINE=1`` reads the cache only);
* any other scheme fsspec knows (``s3://``, ``gs://``, ``az://``, ``http(s)://``, ...; install
  ``s3fs``, ``gcsfs`` or ``adlfs`` for the clouds): the files the manifest lists are downloaded
  to ``$LABELFUSE_CACHE_DIR/bundles/<sha256 of the manifest>/``, each checked against its
  checksum, and the directory is renamed into place whole. A later open of the same bundle on
  the same machine reads only the manifest and reuses the download; a bundle published again
  under the same URI has a new manifest, so it is downloaded again.

On a Ray cluster each node fetches into its own cache: the URI, not a path, travels between nodes.
:func:`publish` copies a bundle to a URI (the manifest last, so a reader never sees a manifest
whose files are not there yet).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from fusion.config import cache_home
from fusion.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # fusion.bundle.MANIFEST (not imported: that module imports torch)


def is_uri(location: str | os.PathLike[str]) -> bool:
    return "://" in str(location)


def cache_root() -> Path:
    return cache_home() / "bundles"


def local_bundle(location: str | os.PathLike[str]) -> Path:
    """The local directory holding the bundle at ``location`` (a path or a URI), fetched first if it is remote."""
    s = str(location)
    if not is_uri(s):
        return Path(s)
    if s.startswith("file://"):
        return Path(unquote(urlparse(s).path))
    if s.startswith("hf://"):
        return _from_hub(s)
    return _from_filesystem(s)


def parse_hub_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``hf://owner/repo[@revision][/subdir]`` -> (repo id, revision, subdir)."""
    rest = uri[len("hf://") :].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"{uri}: a hub bundle is hf://owner/repo[@revision][/subdir]")
    repo, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{repo}", revision or None, "/".join(parts[2:]) or None


def _from_hub(uri: str) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision, subdir = parse_hub_uri(uri)
    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=f"{subdir}/*" if subdir else None
        )
    except LocalEntryNotFoundError:
        raise BundleError(
            f"{uri}: not in the local Hugging Face cache and the hub cannot be reached (HF_HUB_OFFLINE?); "
            "download it once where the hub is reachable, or use a path"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise BundleError(f"{uri}: the hub refused it ({type(err).__name__}: {err})") from None
    return Path(snapshot) / subdir if subdir else Path(snapshot)


def _filesystem(uri: str) -> tuple[Any, str]:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri)
    except ImportError as err:
        raise ConfigError(f"{uri}: {err}") from None  # fsspec names the package to install (s3fs, gcsfs, ...)
    except ValueError as err:
        raise ConfigError(f"{uri}: {err}") from None
    return fs, root.rstrip("/")


def _safe_relative(rel: str, uri: str) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise BundleError(f"{uri}: its manifest lists a file outside the bundle ({rel!r}); refusing to fetch it")
    return str(p)


def _from_filesystem(uri: str) -> Path:
    fs, root = _filesystem(uri)
    try:
        raw = fs.cat_file(f"{root}/{MANIFEST}")
    except FileNotFoundError:
        raise BundleError(f"{uri} is not a labelfuse model bundle: {MANIFEST} is missing") from None
    except Exception as err:  # each filesystem raises its own errors (botocore, aiohttp, ...)
        raise BundleError(f"cannot read {uri}/{MANIFEST}: {type(err).__name__}: {err}") from None
    dest = cache_root() / hashlib.sha256(raw).hexdigest()[:32]
    if (dest / MANIFEST).is_file():  # a download is renamed into place whole: this one is complete
        return dest
    try:
        files = json.loads(raw)["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise BundleError(f"{uri}/{MANIFEST} is corrupted: no file list; re-publish the bundle") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        log.info("fetching bundle %s (%d files) into %s", uri, len(files), dest)
        for rel, digest in files.items():
            target = tmp / _safe_relative(rel, uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{root}/{rel}", str(target))
            except Exception as err:
                raise BundleError(f"{uri} is incomplete: {rel} cannot be read ({type(err).__name__}: {err})") from None
            if sha256_file(target) != digest:
                raise BundleError(f"{uri}: {rel} does not match its checksum; re-publish the bundle")
        (tmp / MANIFEST).write_bytes(raw)
        try:
            tmp.rename(dest)
        except OSError:  # another process fetched the same bundle first: keep its copy
            if not (dest / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def publish(bundle: str | os.PathLike[str], uri: str) -> str:
    """Copy the bundle directory ``bundle`` to ``uri`` (checked first); returns the URI to load it from.

    A hub URI gets a commit (the repo is created if needed) and the returned URI names that commit."""
    from fusion.bundle import read_bundle

    src = Path(bundle)
    files = read_bundle(src).manifest["files"]  # checksums verified: never publish a broken bundle
    if uri.startswith("hf://"):
        import huggingface_hub

        repo_id, revision, subdir = parse_hub_uri(uri)
        api = huggingface_hub.HfApi()
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(src),
            path_in_repo=subdir,
            revision=revision,
            allow_patterns=[*files, MANIFEST],
            commit_message="labelfuse bundle",
        )
        return f"hf://{repo_id}@{info.oid}" + (f"/{subdir}" if subdir else "")
    if not is_uri(uri) or uri.startswith("file://"):
        dest = local_bundle(uri)
        if dest.exists():
            raise ConfigError(f"{dest} exists: publish to a new path")
        shutil.copytree(src, dest)
        return str(dest)
    fs, root = _filesystem(uri)
    for rel in files:
        fs.makedirs(str(PurePosixPath(f"{root}/{rel}").parent), exist_ok=True)
        fs.put_file(str(src / rel), f"{root}/{rel}")
    fs.put_file(str(src / MANIFEST), f"{root}/{MANIFEST}")
    return uri
