"""The project's errors, and the one place asyncpg errors become them.

    DreamLensError
     ├── InvalidRequest        bad input the database refused (CHECK, type, FK)
     ├── Unauthorized
     ├── Forbidden
     │    └── DeviceLinked      a device id that now belongs to a Clerk account
     ├── NotFound
     ├── Conflict              a unique key already taken
     │    └── SchemaTooNew      the database was migrated by newer code
     ├── InsufficientTokens    carries balance and cost
     ├── RateLimited           carries retry_after (seconds)
     ├── Unavailable           carries retry_after (seconds)
     │    ├── DatabaseUnavailable
     │    └── ProviderUnavailable
     └── ConfigurationError    the environment is incomplete; names the variables

Each carries a stable `code` (the API's error code). HTTP statuses are
assigned in one place in functions/, never here. asyncpg raises one class per
SQLSTATE and its messages are localized, so translation goes by class, never
by message text, and always keeps the cause (`raise ... from exc`).
"""

from __future__ import annotations

import asyncio

import asyncpg


class DreamLensError(Exception):
    code = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__


class InvalidRequest(DreamLensError):
    code = "invalid_request"

    def __init__(self, message: str = "Invalid request", details: object = None) -> None:
        super().__init__(message)
        self.details = details


class Unauthorized(DreamLensError):
    code = "unauthorized"


class Forbidden(DreamLensError):
    code = "forbidden"


class DeviceLinked(Forbidden):
    code = "device_linked"


class NotFound(DreamLensError):
    code = "not_found"


class Conflict(DreamLensError):
    code = "conflict"

    def __init__(self, message: str = "Conflict", constraint: str | None = None) -> None:
        super().__init__(message)
        self.constraint = constraint


class InsufficientTokens(DreamLensError):
    code = "insufficient_tokens"

    def __init__(self, balance: int, cost: int) -> None:
        super().__init__(f"Not enough tokens: balance {balance}, cost {cost}")
        self.balance = balance
        self.cost = cost


class RateLimited(DreamLensError):
    code = "rate_limited"

    def __init__(self, message: str = "Too many requests", retry_after: int = 60) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(DreamLensError):
    code = "unavailable"

    def __init__(self, message: str = "Service unavailable", retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DatabaseUnavailable(Unavailable):
    def __init__(self, message: str = "Database unavailable", retry_after: int = 1) -> None:
        super().__init__(message, retry_after)


class ProviderUnavailable(Unavailable):
    def __init__(self, message: str = "Payment provider unavailable", retry_after: int = 5) -> None:
        super().__init__(message, retry_after)


class ConfigurationError(DreamLensError):
    code = "configuration"


class SchemaTooNew(Conflict):
    """The database was migrated by newer code: the caller (init-db) must
    deploy that code. A 409 `conflict`, as API.md lists the codes; the
    message says which versions."""


# Faults worth another attempt: the connection went away or could not be had,
# the server is starting or shutting down (pg_terminate_backend raises
# AdminShutdownError), or the transaction lost a serialization race.
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


# asyncpg's words (never localized) for a connection whose protocol lost its
# footing: a terminated backend's FATAL arrived while the connection sat idle
# in the pool (or between a transaction's statements), and the socket's close
# had not been seen yet. The next operation on it cannot even start.
PROTOCOL_LOST = ("cannot switch to state", "unexpected state", "not connected")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed" / "pool is closing": the socket is gone,
        # another connection will do
        return "closed" in str(exc) or "closing" in str(exc)
    if isinstance(exc, asyncpg.InternalClientError):
        # the executor discards such a connection (database/executor.py)
        return any(words in str(exc) for words in PROTOCOL_LOST)
    return isinstance(exc, TRANSIENT)


def translate(exc: BaseException) -> BaseException:
    """The project error for an asyncpg (or socket) error; others unchanged."""
    if isinstance(exc, DreamLensError):
        return exc
    if isinstance(exc, asyncpg.UniqueViolationError):
        return Conflict("Already exists", constraint=exc.constraint_name)
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return InvalidRequest("Refers to something that does not exist")
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError | asyncpg.DataError):
        # CHECK, NOT NULL, bad text representation, value out of range
        return InvalidRequest("The database refused the value")
    if isinstance(exc, asyncpg.QueryCanceledError):
        # statement_timeout: the statement was rolled back as a whole
        return DatabaseUnavailable("Database statement timed out")
    if isinstance(exc, asyncpg.LockNotAvailableError):
        # lock_timeout (a migration's, or the role's): not retried, as waiting
        # again would only wait again; the caller tries later
        return DatabaseUnavailable("Database is busy; try again shortly")
    if isinstance(exc, asyncpg.InsufficientResourcesError):
        return DatabaseUnavailable("Database has no capacity right now")
    if is_transient(exc):
        return DatabaseUnavailable()
    return exc
