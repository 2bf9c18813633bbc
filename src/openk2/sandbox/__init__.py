"""`openk2.sandbox`: run untrusted code (model-written programs, RL verifiable rewards) under OS isolation and
resource limits; see `core` for the isolation levels and docs/sandbox.md for what each protects against."""

from openk2.sandbox.core import (
    ISOLATION_LEVELS,
    Job,
    Limits,
    RunResult,
    Sandbox,
    SandboxUnavailable,
    detect_isolation,
)

__all__ = ["ISOLATION_LEVELS", "Job", "Limits", "RunResult", "Sandbox", "SandboxUnavailable", "detect_isolation"]
