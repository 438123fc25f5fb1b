"""Typed backend failures: what went wrong decides retry, failover and health penalties."""

from __future__ import annotations

from router.record import ErrorKind, Outcome

#: Failures that say nothing about the backend's health: the caller's fault (4xx) or a
#: polite "come back later" (429). They never count against a breaker or ejection.
NO_HEALTH_PENALTY = frozenset({ErrorKind.CLIENT_ERROR, ErrorKind.RATE_LIMITED})

#: Failures worth trying on another backend. A 4xx is the caller's fault: another
#: backend would refuse it too.
RETRYABLE = frozenset(
    {
        ErrorKind.CONNECT,
        ErrorKind.TIMEOUT,
        ErrorKind.SERVER_ERROR,
        ErrorKind.RATE_LIMITED,
        ErrorKind.MALFORMED,
        ErrorKind.OVERSIZED,
    }
)

OUTCOME_OF = {
    ErrorKind.TIMEOUT: Outcome.TIMEOUT,
    ErrorKind.RATE_LIMITED: Outcome.RATE_LIMITED,
    ErrorKind.CLIENT_ERROR: Outcome.REJECTED,
    ErrorKind.NO_BACKEND: Outcome.ERROR,
    ErrorKind.CANCELLED: Outcome.TIMEOUT,  # the user got no answer in the time they gave
}


class BackendFailure(Exception):
    """A call to one backend failed in a known way."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after_s = retry_after_s
        #: A timeout of an attempt the request's deadline left too little time for: it
        #: fails the user all the same, but says nothing about the backend's health.
        self.cut_by_deadline = False

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    @property
    def health_penalty(self) -> bool:
        return self.kind not in NO_HEALTH_PENALTY and not self.cut_by_deadline

    @property
    def outcome(self) -> Outcome:
        return OUTCOME_OF.get(self.kind, Outcome.ERROR)
