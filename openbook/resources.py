"""Recipes (``configs/``) and launch templates (``launch/``) wherever openbook is installed.

In a checkout (``pip install -e .``) they are the repository's own directories; an installed wheel
carries copies under ``openbook/_bundled/`` (setup.py's build step puts them there). A recipe is named
by path or by name: ``--config default`` and ``--config configs/default.yaml`` both resolve outside a
checkout.
"""

from __future__ import annotations

from pathlib import Path

from openbook.errors import OpenbookError

PACKAGE = Path(__file__).resolve().parent


def resource_dir(kind: str) -> Path:
    """``configs`` or ``launch``: the checkout's when openbook runs from one, else the wheel's copy."""
    checkout = PACKAGE.parent / kind
    if (PACKAGE.parent / "setup.cfg").is_file() and checkout.is_dir():
        return checkout
    bundled = PACKAGE / "_bundled" / kind
    if bundled.is_dir():
        return bundled
    raise OpenbookError(f"{kind}/ not found: neither in a checkout ({checkout}) nor in the installed package "
                        f"({bundled})")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in resource_dir("configs").glob("*.yaml"))


def recipe_path(config: str | Path) -> Path:
    """The recipe file: ``config`` itself when it exists, else the shipped recipe of that name
    (``default``, ``default.yaml`` or ``configs/default.yaml``)."""
    path = Path(config)
    if path.is_file():
        return path
    if path.suffix in ("", ".yaml") and (len(path.parts) == 1 or path.parent.name == "configs"):
        try:
            shipped = resource_dir("configs") / f"{path.stem}.yaml"
        except OpenbookError:
            return path
        if shipped.is_file():
            return shipped
    return path
