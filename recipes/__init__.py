"""Named tier sets and calibration mixes for `pixtral-exl2 quantize --recipe NAME` (TOML files here).

A recipe may set `bpw` (list), `head_bits`, and a `[calibration]` table with the fields of
calibration.rows.CalibrationSpec. Command-line flags override what a recipe sets.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

RECIPE_DIR = Path(__file__).parent
ALLOWED = {"description", "bpw", "head_bits", "calibration"}


class RecipeError(ValueError):
    """An unknown recipe, or one with fields we do not know."""


def list_recipes() -> dict[str, str]:
    """Name -> description of every shipped recipe."""
    return {p.stem: load_recipe(p.stem).get("description", "") for p in sorted(RECIPE_DIR.glob("*.toml"))}


def load_recipe(name: str) -> dict[str, Any]:
    """A shipped recipe by name, or any TOML file by path."""
    path = Path(name) if name.endswith(".toml") else RECIPE_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(RECIPE_DIR.glob("*.toml")))
        raise RecipeError(f"recipe {name!r} not found (shipped recipes: {known}; or give a path to a .toml file)")
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: not valid TOML ({err})") from err
    unknown = set(recipe) - ALLOWED
    if unknown:
        raise RecipeError(f"{path}: unknown field(s) {sorted(unknown)}; allowed: {sorted(ALLOWED)}")
    return recipe
