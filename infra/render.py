"""Fill the ``${PLACEHOLDER}`` values of the deployment templates under infra/ (string.Template syntax).

    mpft render infra/k8s/rayjob.yaml IMAGE=ghcr.io/acme/mpft:0.1.0 NAMESPACE=mpft ... > rayjob.yaml
    mpft render infra/k8s/rayjob.yaml --env            # take unset values from the environment
    mpft render infra/k8s/rayjob.yaml --list           # which placeholders the template needs

Rendering refuses to produce a manifest with a placeholder left unset: a ``${BUCKET}`` that reaches ``kubectl``
would create a resource pointing nowhere, which fails much later and far from the cause. In templates ``$$`` is a
literal ``$`` (shell variables in commands are written ``$$NAME``).
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from pathlib import Path


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
