"""Type predicates shared by the argument checks of the public functions (one rule for "a whole number", one for
"a switch")."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_whole(value: Any) -> bool:
    """An int or numpy integer; not a bool (True is not a tile size), a float or a string."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """An int, float or numpy integer/float; not a bool, a complex number or a string."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def not_a_bool(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be the switch ``name`` (a string such as "no" or "False" would be true), or None."""
    return None if isinstance(value, bool) else f"{name} must be True or False, not {value!r}"
