"""The one list of job states, shared by the job store, the job service and the API's schema.

A job moves queued -> running -> succeeded | failed | cancelled (and running -> queued when its
worker shuts down). ``JobState`` is the type the API's filters and views use, so the OpenAPI
schema can never list a state the store does not know. Stdlib only: the API imports it.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]

QUEUED: Final = "queued"
RUNNING: Final = "running"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"

STATES: tuple[JobState, ...] = get_args(JobState)
TERMINAL_STATES: frozenset[str] = frozenset({SUCCEEDED, FAILED, CANCELLED})

# The stage a job is in while its results are published: the point of no return for a cancel (the
# job service checks the cancel flag in the same compare-and-set that enters this stage).
PUBLISHING_STAGE: Final = "publishing results"
