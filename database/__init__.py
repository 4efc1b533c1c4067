"""The only package that imports asyncpg. Everything else goes through `sql`
(or a `transaction()`), and sees the project's errors, never asyncpg's."""

from database.budget import time_budget
from database.cache import cached_balance, invalidate_balance, remember_balance
from database.errors import (
    ConfigurationError,
    Conflict,
    DatabaseUnavailable,
    DeviceLinked,
    DreamLensError,
    Forbidden,
    InsufficientTokens,
    InvalidRequest,
    NotFound,
    ProviderUnavailable,
    RateLimited,
    SchemaTooNew,
    Unauthorized,
    Unavailable,
)
from database.executor import (
    Executor,
    Transaction,
    ping,
    run_in_transaction,
    run_with_retries,
    sql,
    transaction,
)
from database.migrations import init_database, migration_status

__all__ = [
    "ConfigurationError",
    "Conflict",
    "DatabaseUnavailable",
    "DeviceLinked",
    "DreamLensError",
    "Executor",
    "Forbidden",
    "InsufficientTokens",
    "InvalidRequest",
    "NotFound",
    "ProviderUnavailable",
    "RateLimited",
    "SchemaTooNew",
    "Transaction",
    "Unauthorized",
    "Unavailable",
    "cached_balance",
    "init_database",
    "invalidate_balance",
    "migration_status",
    "ping",
    "remember_balance",
    "run_in_transaction",
    "run_with_retries",
    "sql",
    "time_budget",
    "transaction",
]
