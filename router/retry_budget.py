"""Envoy-style retry budget: retries may be at most a share of the requests in flight.

A fixed "retry 3 times" turns a backend brown-out into triple load exactly when the
fleet is weakest. A budget caps concurrent retries at `max(min_retries, ratio *
in_flight)`, so retries help with isolated failures and back off under mass failure.
"""

from __future__ import annotations


class RetryBudget:
    def __init__(self, ratio: float, min_retries: int) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self.requests_in_flight = 0
        self.retries_in_flight = 0
        self.denied = 0

    def limit(self) -> float:
        return max(float(self.min_retries), self.ratio * self.requests_in_flight)

    def try_acquire(self) -> bool:
        if self.retries_in_flight + 1 > self.limit():
            self.denied += 1
            return False
        self.retries_in_flight += 1
        return True

    def release(self) -> None:
        self.retries_in_flight -= 1


class Unlimited(RetryBudget):
    """The legacy router's behaviour: no budget, only its attempt count."""

    def __init__(self) -> None:
        super().__init__(1.0, 1 << 30)
