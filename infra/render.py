"""Fill the ``${PLACEHOLDER}`` values of the deployment templates under infra/ (string.Template syntax).

    python -m infra.render infra/k8s/rayjob.yaml IMAGE=ghcr.io/acme/mpft:0.1.0 NAMESPACE=mpft ... > rayjob.yaml
    python -m infra.render infra/k8s/rayjob.yaml --env            # take unset values from the environment
    python -m infra.render infra/k8s/rayjob.yaml --list           # which placeholders the template needs

Rendering refuses to produce a manifest with a placeholder left unset: a ``${BUCKET}`` that reaches ``kubectl``
would create a resource pointing nowhere, which fails much later and far from the cause. In templates ``$$`` is a
literal ``$`` (shell variables in commands are written ``$$NAME``).
"""

from __future__ import annotations

import argparse
import os
import string
import sys
from pathlib import Path
from typing import Mapping, Optional


class RenderError(ValueError):
    """A template could not be rendered: placeholders without a value, or a malformed ``$`` expression."""


def placeholders(text: str) -> list[str]:
    """Placeholder names used in ``text``, in order of first use (``$$`` escapes are not placeholders)."""
    names = []
    # Template.get_identifiers()/is_valid() need Python 3.11; the project supports 3.10, so scan with its pattern.
    for match in string.Template.pattern.finditer(text):
        if match.group("invalid") is not None:
            raise RenderError(_invalid_placeholder_message(text, match.start()))
        name = match.group("named") or match.group("braced")
        if name and name not in names:
            names.append(name)
    return names


def render_text(text: str, values: Mapping[str, object], source: str = "<template>") -> str:
    """Substitute every placeholder in ``text``; raises RenderError naming all that have no value (or empty value)."""
    needed = placeholders(text)
    missing = [name for name in needed if name not in values or str(values[name]) == ""]
    if missing:
        raise RenderError(f"{source}: no value for {', '.join(missing)} (needs: {', '.join(needed)})")
    return string.Template(text).substitute({name: str(values[name]) for name in needed})


def render(template_path: str | Path, values: Mapping[str, object]) -> str:
    """Render the template file at ``template_path`` with ``values`` (extra values are ignored)."""
    path = Path(template_path)
    return render_text(path.read_text(), values, source=str(path))


def _invalid_placeholder_message(text: str, offset: int) -> str:
    number = text.count("\n", 0, offset) + 1
    line = text.splitlines()[number - 1].strip()
    return f"line {number}: '$' not followed by a placeholder name (write $$ for a literal $): {line}"


def _parse_assignments(items: list[str]) -> dict[str, str]:
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise RenderError(f"expected NAME=VALUE, got {item!r}")
        values[name] = value
    return values


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("template", type=Path)
    parser.add_argument("values", nargs="*", metavar="NAME=VALUE")
    parser.add_argument("--env", action="store_true", help="fill placeholders not given as NAME=VALUE from the env")
    parser.add_argument("--list", action="store_true", help="print the template's placeholders and exit")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        text = args.template.read_text()
        if args.list:
            print("\n".join(placeholders(text)))
            return 0
        values = {**(dict(os.environ) if args.env else {}), **_parse_assignments(args.values)}
        rendered = render_text(text, values, source=str(args.template))
    except (RenderError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        args.output.write_text(rendered)
    else:
        sys.stdout.write(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
