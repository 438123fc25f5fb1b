"""Answer backends: where a question can be sent and what an answer costs there."""

from __future__ import annotations

import base64
import functools
import os
import re
from enum import StrEnum

import httpx
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr, field_validator


class BackendKind(StrEnum):
    LIGHTRAG = "lightrag"
    PERPLEXITY = "perplexity"


class CostModel(BaseModel):
    """Price of one request: a fixed part plus tokens. Self-hosted LightRAG has a compute price."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_request_usd: float = Field(default=0.0, ge=0)
    per_1k_input_tokens_usd: float = Field(default=0.0, ge=0)
    per_1k_output_tokens_usd: float = Field(default=0.0, ge=0)

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (
            self.per_request_usd
            + tokens_in * self.per_1k_input_tokens_usd / 1000.0
            + tokens_out * self.per_1k_output_tokens_usd / 1000.0
        )


DEFAULT_COSTS: dict[BackendKind, CostModel] = {
    BackendKind.LIGHTRAG: CostModel(per_request_usd=0.0004, per_1k_output_tokens_usd=0.0002),
    BackendKind.PERPLEXITY: CostModel(
        per_request_usd=0.005, per_1k_input_tokens_usd=0.001, per_1k_output_tokens_usd=0.001
    ),
}


ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_env_name(value: str | None) -> str | None:
    """`*_api_key_env` holds a variable's NAME. A key pasted there instead is refused,
    without echoing it (the message never contains the value)."""
    if value is not None and not ENV_NAME.fullmatch(value):
        raise ValueError(
            "must be the NAME of the environment variable that holds the API key "
            "(letters, digits, _), not the key itself"
        )
    return value


@functools.lru_cache(maxsize=1024)  # on every request's path: parse each URL once
def split_credentials(url: str) -> tuple[str, str | None]:
    """`url` without its user info, and that user info as an HTTP Basic `Authorization`
    value (None without any). httpx logs every request's URL at INFO: credentials left
    in it would reach the logs on every call, health probe and control poll."""
    parsed = httpx.URL(url)
    if not parsed.userinfo:
        return url, None
    pair = f"{parsed.username}:{parsed.password}".encode()
    bare = str(parsed.copy_with(username=None, password=None))
    return bare, "Basic " + base64.b64encode(pair).decode("ascii")


#: Connections per backend unless its config says otherwise (`max_connections`).
DEFAULT_POOL_SIZE = 128


class BackendConfig(BaseModel):
    """One answer backend instance.

    The API key is never stored in a document: `api_key_env` names the environment
    variable that holds it, so configs, logs and the metrics database stay secret-free.
    """

    # An embedding app that logs a ValidationError must not log a pasted key with it.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: BackendKind
    base_url: HttpUrl
    api_key_env: str | None = None
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    region: str = "eu-central"
    cost: CostModel | None = None
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    model: str = "sonar"
    #: Connections open to this backend at once (its own pool); a request waits for a
    #: free one within its deadline. Raise it for a slow API called very concurrently.
    max_connections: int = Field(default=DEFAULT_POOL_SIZE, ge=1, le=4096)

    _env_name = field_validator("api_key_env")(check_env_name)

    @field_validator("base_url")
    @classmethod
    def _http_only(cls, value: HttpUrl) -> HttpUrl:
        if value.scheme not in ("http", "https"):
            raise ValueError(f"base_url must be http or https, got {value.scheme}")
        return value

    @property
    def url(self) -> str:
        """The base URL as requested and logged: without user info (`basic_auth`)."""
        return split_credentials(str(self.base_url))[0].rstrip("/")

    def basic_auth(self) -> str | None:
        """`user:password@` (or `token@`) in base_url, as an HTTP Basic Authorization value:
        a LightRAG behind an authenticating proxy."""
        return split_credentials(str(self.base_url))[1]

    @property
    def cost_model(self) -> CostModel:
        return self.cost or DEFAULT_COSTS[self.kind]

    def api_key(self) -> SecretStr | None:
        if not self.api_key_env:
            return None
        # Keys mounted from files often end in a newline, which no HTTP header may hold:
        # the transport's error would then quote the key in an escaped form that
        # redaction does not recognise.
        value = (os.environ.get(self.api_key_env) or "").strip()
        return SecretStr(value) if value else None
