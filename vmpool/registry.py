"""Finding drivers by name.

Drivers are entry points of the group ``vmpool.drivers``: a third party adds
one by declaring an entry point in its own package, without touching vmpool.
``register_driver`` adds one at runtime (embedding, tests).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from .errors import UnknownDriverError
from .vmms import VMMS

ENTRY_POINT_GROUP = "vmpool.drivers"

DriverFactory = Callable[..., VMMS]

_registered: dict[str, DriverFactory] = {}


def register_driver(name: str, factory: DriverFactory) -> None:
    """Make ``factory`` available as driver ``name`` (overrides an entry point)."""
    _registered[name] = factory


def available_drivers() -> list[str]:
    names = set(_registered)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def driver_factory(name: str) -> DriverFactory:
    if name in _registered:
        return _registered[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                factory = ep.load()
            except ImportError as e:
                raise UnknownDriverError(
                    f"driver {name!r} needs a package that is not installed ({e}); "
                    f"install vmpool's extra for it: pip install 'vmpool[{name}]'"
                ) from None
            if not callable(factory):
                raise UnknownDriverError(
                    f"entry point {ep.value!r} for driver {name!r} is not callable"
                )
            return factory  # type: ignore[no-any-return]
    known = ", ".join(available_drivers()) or "none"
    raise UnknownDriverError(
        f"no driver named {name!r} (known: {known}); drivers are entry points of the "
        f"group {ENTRY_POINT_GROUP!r} — is the package that provides it installed?"
    )


def load_driver(name: str, **options: Any) -> VMMS:
    """Instantiate driver ``name`` with ``options``."""
    return driver_factory(name)(**options)
