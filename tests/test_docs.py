"""The README documents what the code does."""

import re
from pathlib import Path

from pydantic import BaseModel

from fusion.cli import build_parser
from fusion.config import Config

REPO = Path(__file__).parent.parent
README = (REPO / "README.md").read_text()


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        ann = f.annotation
        inner = [a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)]
        if inner and name != "llms":
            yield from _fields(inner[0], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_every_config_field_is_in_the_configuration_reference():
    section = README.split("## Configuration", 1)[1]
    missing = [f for f in _fields(Config) if f"`{f}`" not in section]
    assert not missing, f"README configuration reference lacks {missing}"


def test_every_cli_subcommand_is_documented():
    sub = build_parser()._subparsers._group_actions[0].choices
    for name in sub:
        assert re.search(rf"labelfuse {name}\b", README), name


def test_first_screen_has_the_two_commands():
    first = "\n".join(README.splitlines()[:40])
    assert "make demo" in first and "make test" in first


def test_every_serve_app_arg_is_in_the_readme():
    from serve.settings import AppSettings

    section = README.split("## Serving on Ray Serve", 1)[1].split("\n## ", 1)[0]
    missing = [f for f in _fields(AppSettings) if f"`{f}`" not in section]
    assert not missing, f"README serving section lacks {missing}"


def test_every_serve_metric_is_in_the_readme():
    names = set(re.findall(r'"(labelfuse_[a-z_]+)"', (REPO / "serve" / "metrics.py").read_text()))
    assert len(names) >= 10
    missing = [n for n in sorted(names) if f"`{n}`" not in README]
    assert not missing, f"metrics missing from the README table: {missing}"
