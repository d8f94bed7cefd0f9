"""The engine: the only code that changes an operation's status on behalf of workers.

Everything that decides *whether* an operation may run lives here, once; transports (the
DB-polling worker, ``batchframework_celery``) only decide *when and where* to call it.

- ``enqueue``  store operations and dispatch them after commit
- ``claim``    the atomic compare-and-set from unprocessed to running
- ``run``      run a claimed operation's handler and finish it, fenced by the claim
- ``batch``    run a claimed batch: keep its leases, finish quick successes together
- ``recover``  put back (or fail) operations whose worker's lease expired
- ``control``  cancel, postpone and report progress
- ``abandon``  fail running operations without a claim whose process is gone
"""

from ._common import write_alias
from .abandon import fail_abandoned
from .batch import BatchRunner
from .claim import (
    claim,
    claim_due,
    claims_needed,
    must_be_claimed_alone,
    release,
    renew_leases,
)
from .control import CancelOutcome, cancel, cancel_many, postpone, set_progress
from .enqueue import enqueue, enqueue_many
from .recover import recover_expired
from .run import RunOutcome, run, run_claimed

__all__ = [
    "BatchRunner",
    "CancelOutcome",
    "RunOutcome",
    "cancel",
    "cancel_many",
    "claim",
    "claim_due",
    "claims_needed",
    "enqueue",
    "enqueue_many",
    "fail_abandoned",
    "must_be_claimed_alone",
    "postpone",
    "recover_expired",
    "release",
    "renew_leases",
    "run",
    "run_claimed",
    "set_progress",
    "write_alias",
]
