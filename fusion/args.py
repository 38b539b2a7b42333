"""Command-line arguments shared by ``labelfuse``, its plugins (serve, demo) and the data jobs.

One spelling per thing across every command and job: ``--bundle DIR`` for a model bundle,
``--output PATH`` for what a command writes. The old spellings (``--model``, ``--out``) still
work for one release, with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusion.errors import ConfigError

if TYPE_CHECKING:
    from fusion.config import Config


class _Deprecated(argparse.Action):
    """An old option spelling: does what ``new`` does, says so on stderr, hidden from --help."""

    def __init__(self, option_strings: list[str], dest: str, new: str, const: Any = None, **kwargs: Any):
        kwargs.setdefault("default", argparse.SUPPRESS)
        nargs = 0 if const is not None else None
        super().__init__(option_strings, dest, nargs=nargs, const=const, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: str | None = None
    ) -> None:
        print(f"warning: {option_string} is deprecated and will be removed; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def deprecated(p: Any, old: str, new: str, *, dest: str, const: Any = None) -> None:
    """Add ``old`` to ``p`` (a parser or group) as a hidden, warning alias of ``new``."""
    p.add_argument(old, action=_Deprecated, new=new, dest=dest, const=const)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except empty ones (None, False, []) and where the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default
        if d is None or d is False or d in ([], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """:class:`HelpFormatter` for ``parser`` and every subcommand under it."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)


def refuse_unused(given: dict[str, Any], why: str) -> None:
    """A ConfigError naming the options given (not None or False) that would be ignored, and why."""
    unused = [flag for flag, value in given.items() if value is not None and value is not False]
    if unused:
        raise ConfigError(f"{', '.join(unused)}: {why}")


def add_bundle_arg(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    """``--bundle DIR|URI`` (old spelling: ``--model``); a URI is fetched (``fusion.remote``)."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--bundle", metavar="DIR|URI", help=help)
    deprecated(g, "--model", "--bundle", dest="bundle")


def add_output_arg(p: argparse.ArgumentParser, help: str, required: bool = True, **kwargs: Any) -> None:
    """``--output PATH`` (old spelling: ``--out``)."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--output", help=help, **kwargs)
    deprecated(g, "--out", "--output", dest="output")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config file (default: built-in defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config value, e.g. --set train.seed=7 --set encoder.max_length=128 (repeatable)",
    )


LLM_SPEC_HELP = (
    "an LLM to fuse, as [NAME=]PROVIDER:MODEL[@BASE_URL], e.g. local:qwen2.5-coder-0.5b, "
    "openai:gpt-4o-mini, fast=local:smollm2-135m, vllm:my-model@http://gpu1:8000/v1 (repeatable; "
    "replaces config llms)"
)


def parse_llm_spec(spec: str) -> dict[str, Any]:
    """``[NAME=]PROVIDER:MODEL[@BASE_URL]`` to an ``llms`` config entry."""
    import re

    m = re.fullmatch(r"(?:(?P<name>[A-Za-z0-9_.-]+)=)?(?P<provider>[a-z]+):(?P<model>[^@]+?)(?:@(?P<url>\S+))?", spec)
    if not m:
        raise ConfigError(f"--llm {spec!r}: expected [NAME=]PROVIDER:MODEL[@BASE_URL], e.g. local:smollm2-135m")
    model = m["model"]
    base = Path(model).stem if model.endswith(".gguf") else model
    name = m["name"] or re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-")
    entry: dict[str, Any] = {"name": name, "provider": m["provider"], "model": model}
    if m["url"]:
        entry["base_url"] = m["url"]
    return entry


def add_llm_args(p: argparse.ArgumentParser, train: bool, gate: bool = True) -> None:
    """``--llm-budget``; with ``train`` also ``--llm`` and, unless ``gate`` is False, ``--gate-rate`` and
    ``--gate-accuracy``."""
    if train:
        p.add_argument("--llm", action="append", default=[], metavar="SPEC", help=LLM_SPEC_HELP)
    if train and gate:
        p.add_argument(
            "--gate-rate",
            type=float,
            metavar="R",
            help="enable cost gating: call the LLMs for the R share of texts the encoder is least sure about "
            "(config: gating.enabled, gating.target_call_rate)",
        )
        p.add_argument(
            "--gate-accuracy",
            type=float,
            metavar="A",
            help="enable cost gating at the lowest LLM-call rate whose validation accuracy reaches A "
            "(config: gating.target_accuracy)",
        )
    p.add_argument(
        "--llm-budget", type=float, metavar="USD", help="dollar cap on LLM calls (config: llm_limits.budget_usd)"
    )


def config_from_args(args: argparse.Namespace) -> Config:
    from fusion.config import Config, apply_overrides, load_config

    cfg = load_config(args.config) if args.config else Config()
    return apply_overrides(cfg, args.overrides) if args.overrides else cfg


def with_llm_args(config: Config, args: argparse.Namespace) -> Config:
    from fusion.config import parse_config

    data = config.model_dump()
    if getattr(args, "llm", None):
        data["llms"] = [parse_llm_spec(spec) for spec in args.llm]
    if getattr(args, "gate_rate", None) is not None:
        data["gating"] = {"enabled": True, "target_call_rate": args.gate_rate}
    if getattr(args, "gate_accuracy", None) is not None:
        data["gating"] = {**data["gating"], "enabled": True, "target_accuracy": args.gate_accuracy}
    if getattr(args, "llm_budget", None) is not None:
        data["llm_limits"]["budget_usd"] = args.llm_budget
    return parse_config(data, source="config with command-line LLM options")
