"""quantkit models / quantkit recipes: list what is bundled."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("models", help="list the bundled real models")
    p.set_defaults(func=run_models)
    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.set_defaults(func=run_recipes)


def run_models(args) -> int:
    from ..models.sources import BUNDLED

    for b in BUNDLED.values():
        print(f"{b.name:16s} {b.description}  [{b.dist}=={b.version}; install: {b.install}]")
    return 0


def run_recipes(args) -> int:
    from ..recipe import builtin_recipes, load_recipe

    for name, path in sorted(builtin_recipes().items()):
        print(f"{name:24s} {load_recipe(path).description}")
    return 0
