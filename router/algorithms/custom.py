"""`custom`: a user's own algorithm class, named as 'module:Class' and checked at start-up.

Checked at start-up so a typo stops the application with a message naming the string,
instead of failing the first user request.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Sequence
from typing import Any

from router.algorithms.base import Algorithm, Choice, Observation, RequestContext
from router.backend_state import BackendState
from router.production_config import ProductionLoadBalancingConfig

REQUIRED = ("choose", "observe")

log = logging.getLogger(__name__)


def _fail(spec: str, problem: str) -> ValueError:
    return ValueError(f"custom_algorithm {spec!r}: {problem}")


def load_class(spec: str) -> type[Any]:
    """Resolve 'package.module:Class' (or 'module:Outer.Inner') to a class with
    `choose`, `observe` and `name`; a ValueError says what is wrong otherwise."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip():
        raise _fail(spec, "must have the form 'module:Class', e.g. 'my_pkg.routing:MyAlgorithm'")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised by the module's code
        raise _fail(
            spec, f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise _fail(spec, f"module {module_name!r} has no attribute {attr_path!r}") from None
    if not inspect.isclass(target):
        raise _fail(spec, f"{attr_path!r} is a {type(target).__name__}, not a class")
    missing = [m for m in REQUIRED if not callable(getattr(target, m, None))]
    if missing:
        raise _fail(
            spec,
            f"class {target.__name__} lacks method(s) {', '.join(missing)}; an algorithm "
            "needs choose(candidates, ctx) -> Choice, observe(backend, observation) and name",
        )
    return target


def _takes_argument(cls: type[Any]) -> bool:
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: assume no arguments
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters
    )


def load_custom_algorithm(spec: str | None, config: ProductionLoadBalancingConfig) -> Algorithm:
    """Import and instantiate the class: with `(config)` if its constructor takes a
    positional argument, else with none."""
    if not spec:
        raise ValueError("algorithm 'custom' needs custom_algorithm='module:Class'")
    cls = load_class(spec)
    try:
        instance = cls(config) if _takes_argument(cls) else cls()
    except Exception as exc:
        raise _fail(
            spec, f"constructing {cls.__name__} failed: {type(exc).__name__}: {exc}"
        ) from exc
    name = getattr(instance, "name", None)
    if not isinstance(name, str) or not name:
        raise _fail(spec, f"class {cls.__name__} lacks a non-empty str attribute 'name'")
    return instance


class CustomAlgorithm:
    """Rule: whatever the user's class decides, held to the contract: if it returns no
    `Choice`, or its pick is not one of the candidates (for example an ejected backend it
    remembered), or if it raises, the first candidate is used instead and the reason
    says why, so a bug in user code can neither fail a request nor route to a backend
    the balancer ruled out (an exception is logged once per method and type).

    `name` is `custom:<the class's name>`, which is what metrics rows record.
    """

    def __init__(self, spec: str | None, config: ProductionLoadBalancingConfig) -> None:
        self.spec = spec
        self.inner = load_custom_algorithm(spec, config)
        self.name = f"custom:{self.inner.name}"
        self._logged: set[tuple[str, type[BaseException]]] = set()

    def choose(self, candidates: Sequence[BackendState], ctx: RequestContext) -> Choice:
        try:
            choice = self.inner.choose(candidates, ctx)
        except Exception as exc:  # a bug in user code must not fail the user's request
            self._log_once("choose", exc)
            picked = candidates[0]
            return Choice(
                picked,
                f"custom algorithm raised {type(exc).__name__}: {exc}; fell back to {picked.name}",
            )
        if isinstance(choice, Choice):
            backend = choice.backend
            for candidate in candidates:
                if candidate is backend:
                    return choice
            got = f"backend {getattr(backend, 'name', backend)!r}, not a candidate"
        else:
            got = f"a {type(choice).__name__}, not a Choice"
        picked = candidates[0]
        return Choice(picked, f"custom algorithm returned {got}; fell back to {picked.name}")

    def observe(self, backend: BackendState, observation: Observation) -> None:
        try:
            self.inner.observe(backend, observation)
        except Exception as exc:  # the answer is already in hand: keep it
            self._log_once("observe", exc)

    def _log_once(self, method: str, exc: Exception) -> None:
        """The traceback once per method and exception type, not once per request."""
        key = (method, type(exc))
        if key not in self._logged:
            self._logged.add(key)
            log.error("custom algorithm %s.%s raised", self.spec, method, exc_info=exc)
