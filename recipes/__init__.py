"""Named tier sets and calibration mixes for `pixtral-exl2 quantize --recipe NAME` (TOML files here).

A recipe may set `bpw` (list), `head_bits`, and a `[calibration]` table with the fields of
calibration.rows.CalibrationSpec. Command-line flags override what a recipe sets; unknown fields
and values of the wrong type are refused with the file and field named.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from calibration.rows import CalibrationSpec
from pixtral.errors import UserError
from quantize.job import QuantizeConfig

RECIPE_DIR = Path(__file__).parent
ALLOWED = {"description", "bpw", "head_bits", "calibration"}


class RecipeError(UserError):
    """An unknown recipe, or one with fields we do not know."""


def recipe_names() -> list[str]:
    return [p.stem for p in sorted(RECIPE_DIR.glob("*.toml"))]


def load_recipe(name: str) -> dict[str, Any]:
    """A shipped recipe by name, or any TOML file by path."""
    path = Path(name) if name.endswith(".toml") else RECIPE_DIR / f"{name}.toml"
    if not path.is_file():
        raise RecipeError(
            f"recipe {name!r} not found (shipped recipes: {', '.join(recipe_names())}; or give a path to a .toml file)"
        )
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: not valid TOML ({err})") from err
    unknown = set(recipe) - ALLOWED
    if unknown:
        raise RecipeError(f"{path}: unknown field(s) {sorted(unknown)}; allowed: {sorted(ALLOWED)}")
    calibration = recipe.get("calibration", {})
    if not isinstance(calibration, dict):
        raise RecipeError(f"{path}: [calibration] must be a table")
    fields = {f.name for f in dataclasses.fields(CalibrationSpec)}
    unknown = set(calibration) - fields
    if unknown:
        raise RecipeError(f"{path}: unknown field(s) in [calibration]: {sorted(unknown)}; allowed: {sorted(fields)}")
    bpw = recipe.get("bpw", [])
    if not isinstance(bpw, list) or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bpw):
        raise RecipeError(f"{path}: bpw must be a list of numbers, e.g. [2.5, 4.0]")
    return recipe


def quantize_config(recipe_name: str, model_dir: Path, out_dir: Path, flags: dict[str, Any]) -> QuantizeConfig:
    """A QuantizeConfig from a recipe, then the flags that were given (None = not given).

    `flags` holds QuantizeConfig fields plus a `calibration` dict of CalibrationSpec fields; value
    ranges are checked later, against the model (quantize.preflight.check_options).
    """
    recipe = load_recipe(recipe_name)
    flags = dict(flags)
    given = {k: v for k, v in flags.pop("calibration", {}).items() if v is not None}
    calibration = {**recipe.get("calibration", {}), **given}
    for key in ("text_sources", "image_sources"):
        if key in calibration:
            calibration[key] = tuple(str(p) for p in calibration[key])
    fields = {k: v for k, v in flags.items() if v is not None}
    return QuantizeConfig(
        model_dir=model_dir,
        out_dir=out_dir,
        tiers=tuple(fields.pop("tiers", None) or recipe.get("bpw", (4.0,))),
        head_bits=fields.pop("head_bits", recipe.get("head_bits", 6)),
        calibration=CalibrationSpec(**calibration),
        **fields,
    )
