"""Defense registry: name -> factory ``(DefenseContext) -> Defense``.

Register a new defense from anywhere (no edit of this package needed), with its typed
settings (a :class:`~fedredefense_jax.settings.Settings` dataclass, as the attacks' in
``fedredefense_jax/attacks/__init__.py``; ``ctx.config`` is an instance of it)::

    from fedredefense_jax import defenses

    @defenses.register("my_rule", settings=MyRuleSettings)
    def make_my_rule(ctx: defenses.DefenseContext) -> defenses.Defense:
        ...
"""

from __future__ import annotations

from fedredefense_jax.defenses.base import (  # noqa: F401  (re-exported)
    Defense,
    DefenseContext,
    DefenseInput,
    DefenseOutput,
    fedavg,
    nonfinite_rows,
)
from fedredefense_jax.registry import Registry


def _load_builtins() -> None:
    # Imported lazily so that the rules can import this registry without a cycle.
    from fedredefense_jax.defenses import average as _average  # noqa: F401
    from fedredefense_jax.defenses import flame as _flame  # noqa: F401
    from fedredefense_jax.defenses import flcert as _flcert  # noqa: F401
    from fedredefense_jax.defenses import fldetector as _fldetector  # noqa: F401
    from fedredefense_jax.defenses import fltrust as _fltrust  # noqa: F401
    from fedredefense_jax.defenses import redefense as _redefense  # noqa: F401
    from fedredefense_jax.defenses import robust as _robust  # noqa: F401


_REGISTRY = Registry("defense", _load_builtins)
register = _REGISTRY.register
unregister = _REGISTRY.unregister
names = _REGISTRY.names
make = _REGISTRY.make
settings = _REGISTRY.settings
parse_settings = _REGISTRY.parse_settings
