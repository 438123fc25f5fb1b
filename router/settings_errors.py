"""Turn pydantic validation errors on environment variables into one line per bad variable.

Operators fix env files under pressure: each line names the variable, the value given
and what is allowed, and never echoes a secret.
"""

from __future__ import annotations

import difflib
import re
import types
from enum import Enum
from typing import Any, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

SECRET_MARKERS = ("KEY", "SECRET", "TOKEN", "PASSWORD")


class SettingsError(ValueError):
    """Configuration that must stop start-up; `lines` holds one message per bad variable."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


#: `scheme://user:password@host`: the password part of a URL's userinfo.
_URL_PASSWORD = re.compile(r"(//[^/:@\s]*):[^@/\s]*@")

#: `scheme://token@host`: userinfo with no password, often a token on its own.
_URL_USER_ONLY = re.compile(r"(//)[^/:@\s]+@")

#: A URL's query (`?token=abc&page=2`, up to a fragment, space or quote).
_URL_QUERY = re.compile(r"(://[^?#\s'\"]*\?)([^#\s'\"]*)")


def _mask_query(match: re.Match[str]) -> str:
    parts = match.group(2).split("&")
    masked = [f"{part.split('=', 1)[0]}=***" if "=" in part else "***" for part in parts if part]
    return match.group(1) + "&".join(masked)


def mask_url(text: str) -> str:
    """`text` with any URL password, a user name standing alone (`//token@host`), and every
    URL query value replaced by *** (services take keys as `?token=...` as often as in
    the userinfo)."""
    masked = _URL_USER_ONLY.sub(r"\1***@", _URL_PASSWORD.sub(r"\1:***@", text))
    return _URL_QUERY.sub(_mask_query, masked)


def mask(name: str, value: object) -> str:
    """A value as an error shows it: secrets as ***, and any URL in it without its
    password or query values (an invalid PROD_LB_PERPLEXITY_URL printed both)."""
    if any(marker in name.upper() for marker in SECRET_MARKERS):
        return "'***'"
    if isinstance(value, list | tuple):
        return repr([mask_url(str(item)) for item in value])
    return repr(mask_url(value)) if isinstance(value, str) else repr(value)


def _bounds(info: FieldInfo) -> str:
    low = high = None
    for item in info.metadata:
        if isinstance(item, Ge):
            low = f"from {item.ge}"
        elif isinstance(item, Gt):
            low = f"above {item.gt}"
        elif isinstance(item, Le):
            high = f"to {item.le}" if low and low.startswith("from") else f"at most {item.le}"
        elif isinstance(item, Lt):
            high = f"below {item.lt}"
    return " ".join(part for part in (low, high) if part)


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def describe_allowed(info: FieldInfo) -> str:
    annotation = _strip_optional(info.annotation)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(str(m.value) for m in annotation)
    if annotation is bool:
        return "true or false"
    if annotation in (int, float):
        kind = "a whole number" if annotation is int else "a number"
        bounds = _bounds(info)
        return f"{kind} {bounds}".strip()
    return ""


def _suggestions(bare: str, known: list[str], prefix: str) -> list[str]:
    """Names the unknown one is a shortened form of (ALGORITHM: PRIMARY_ALGORITHM and
    CUSTOM_ALGORITHM, both), else the closest spelling (TRAFIC_PERCENT)."""
    shortened = [
        k
        for k in known
        if k.endswith(f"_{bare}") or k.startswith(f"{prefix}{bare}_") or f"_{bare}_" in k
    ]
    if shortened:
        return shortened[:3]
    return difflib.get_close_matches(f"{prefix}{bare}", known, n=1)


def format_error(exc: ValidationError, model: type[BaseModel], prefix: str) -> SettingsError:
    lines: list[str] = []
    fields = model.model_fields
    seen: set[str] = set()
    for error in exc.errors():
        loc = error.get("loc") or ()
        field = str(loc[0]) if loc else ""
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        if not field:
            lines.append(message)
            continue
        if field in seen:
            continue
        seen.add(field)
        value = error.get("input")
        if error.get("type") == "extra_forbidden":
            # Unknown names arrive whole ("prod_lb_trafic"), known ones without the prefix.
            var = field.upper()
            if not var.startswith(prefix):
                lines.append(f"{var} is not a {prefix}* variable: profiles hold only those")
                continue
            known = [f"{prefix}{name.upper()}" for name in fields]
            close = _suggestions(var.removeprefix(prefix), known, prefix)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            lines.append(f"{var} is not a known variable{hint}")
            continue
        var = f"{prefix}{field.upper()}"
        allowed = describe_allowed(fields[field]) if field in fields else ""
        reason = f"allowed: {allowed}" if allowed else message
        lines.append(f"{var}={mask(var, value)} is invalid; {reason}")
    return SettingsError(lines or [str(exc)])
