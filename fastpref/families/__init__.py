"""The families of training and the registry of every ``--loss``.

``FAMILIES`` lists the families; ``OBJECTIVES`` maps each ``--loss`` name to its
:class:`~fastpref.families.base.Objective` and :func:`family_of` to its family. Adding a family
is one file here and one entry in ``FAMILIES`` (or :func:`register` at run time, e.g. a test's
toy family); the loop in ``fastpref.train`` only ever sees this interface.
"""

from __future__ import annotations

from fastpref.errors import ConfigError
from fastpref.families.base import Family, Objective, Option

__all__ = [
    "FAMILIES",
    "OBJECTIVES",
    "Family",
    "Objective",
    "Option",
    "family_of",
    "get_objective",
    "register",
]

FAMILIES: list[Family] = []
OBJECTIVES: dict[str, Objective] = {}
_FAMILY_OF: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` and its objectives to the registry; a taken ``--loss`` name is an error."""
    for objective in family.objectives:
        if objective.name in OBJECTIVES:
            raise ValueError(
                f"--loss {objective.name!r} of family {family.name!r} is already registered "
                f"by family {_FAMILY_OF[objective.name].name!r}"
            )
    FAMILIES.append(family)
    for objective in family.objectives:
        OBJECTIVES[objective.name] = objective
        _FAMILY_OF[objective.name] = family
    return family


def unregister(family: Family) -> None:
    """Remove a family added with :func:`register` (for tests)."""
    FAMILIES.remove(family)
    for objective in family.objectives:
        OBJECTIVES.pop(objective.name, None)
        _FAMILY_OF.pop(objective.name, None)


def get_objective(name: str) -> Objective:
    """The objective registered as ``--loss name``; ConfigError listing the choices if none."""
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        choices = ", ".join(OBJECTIVES)
        raise ConfigError(f"unknown loss {name!r}; choose one of: {choices}") from None


def family_of(name: str) -> Family:
    get_objective(name)
    return _FAMILY_OF[name]


def _register_builtin() -> None:
    from fastpref.families import lm_preference, reranker, reward

    for family in (lm_preference.FAMILY, reward.FAMILY, reranker.FAMILY):
        register(family)
    from fastpref.families import embedding

    register(embedding.FAMILY)


_register_builtin()
