"""`mpft render TEMPLATE NAME=VALUE ...`: fill the ``${PLACEHOLDERS}`` of a deployment template (see infra/render.py).

Exit status 2, with one line on stderr, when a placeholder has no value or the template cannot be read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from infra.render import RenderError, placeholders, render_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("template", type=Path, help="e.g. infra/k8s/rayjob.yaml")
    parser.add_argument("values", nargs="*", metavar="NAME=VALUE")
    parser.add_argument("--env", action="store_true", help="fill placeholders not given as NAME=VALUE from the env")
    parser.add_argument("--list", action="store_true", help="print the template's placeholders and exit")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")


def main(args: argparse.Namespace) -> int:
    try:
        text = args.template.read_text()
        if args.list:
            print("\n".join(placeholders(text)))
            return 0
        values = {**(dict(os.environ) if args.env else {}), **parse_assignments(args.values)}
        rendered = render_text(text, values, source=str(args.template))
    except (RenderError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        args.output.write_text(rendered)
    else:
        sys.stdout.write(rendered)
    return 0


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` arguments as a dict; RenderError for an item without a name or an ``=``."""
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise RenderError(f"expected NAME=VALUE, got {item!r}")
        values[name] = value
    return values
