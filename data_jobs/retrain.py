"""Retrain on the label store, compare with the champion, promote or refuse: the loop as a Ray job.

    ray job submit --working-dir . -- python -m data_jobs.retrain --store labels/ --registry models/
    python -m data_jobs.retrain --store s3://bucket/labels --registry /shared/models --min-new-labels 500

The same as ``labelfuse retrain`` (:func:`fusion.loop.retrain`), run as one Ray task with the CPUs and GPUs
asked for (``--num-gpus 1`` trains on a GPU worker), so a scheduled job on a cluster lands where the
resources are. The label store and the registry must be reachable from that worker. The report is
printed as JSON and kept in the registry; a Serve app whose ``bundle`` is the registry rolls a promoted
champion out by itself. On a schedule: docs/learning-loop.md (a KubeRay RayJob).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from data_jobs import common


def build_parser() -> argparse.ArgumentParser:
    from fusion.loop_cli import add_loop_args

    p = common.job_parser("Retrain a challenger on the label store; promote it when it is not worse.")
    add_loop_args(p)
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs for the retraining task")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs for the retraining task")
    return p


def _retrain(store: str, registry: str, settings: Any, config: Any, overrides: list[str]) -> dict[str, Any]:
    from fusion.labelstore import LabelStore
    from fusion.loop import retrain
    from fusion.registry import Registry

    return retrain(LabelStore(store), Registry(registry), settings, config=config, overrides=overrides)


def run(args: argparse.Namespace) -> int:
    import ray

    from fusion.loop_cli import loop_config, loop_settings, print_report

    common.connect(args.address)
    settings, config = loop_settings(args), loop_config(args)
    task = ray.remote(num_cpus=args.num_cpus, num_gpus=args.num_gpus)(_retrain)
    report = ray.get(task.remote(args.store, args.registry, settings, config, args.overrides or []))
    print_report(report)
    common.log.info("%s: %s", report["decision"], report["reason"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
