"""Dead-letter policy: which failures are retried, and what a rejected message records.

A message whose actor fails permanently (bad data that no retry can fix), or
fails transiently more than `max_retries` times, is nacked: dramatiq-pg marks it
`rejected` in the queue table, where `farmiq-edge dlq` shows it with the reason
stored here until an operator re-drives or purges it.
"""

from collections.abc import Callable

from dramatiq.middleware import Middleware
from prometheus_client import Counter

DEAD_LETTERS = Counter("farmiq_edge_queue_dead_letters_total",
                       "Queue messages rejected after their retries (see `farmiq-edge dlq`).",
                       ["queue", "actor"])


class PermanentError(Exception):
    """The message can never succeed; retrying it would only delay the dead letter."""


def retry_unless_permanent(max_retries: int) -> Callable[[int, BaseException], bool]:
    def retry_when(retries: int, exception: BaseException) -> bool:
        return retries < max_retries and not isinstance(exception, PermanentError)
    return retry_when


class DeadLetters(Middleware):
    """Records why a message was rejected and counts it.

    Must be listed BEFORE Retries: dramatiq runs after_* hooks in reverse
    order, so this one then runs after Retries has decided the message failed.
    """

    def after_process_message(self, broker, message, *, result=None, exception=None):
        if exception is not None and message.failed:
            message.options["dead_letter_reason"] = f"{type(exception).__name__}: {exception}"[:1000]

    def after_nack(self, broker, message):
        DEAD_LETTERS.labels(message.queue_name, message.actor_name).inc()
