"""``segpipe submit``, ``status`` and ``logs``: run a job on a Ray cluster through Ray's Job
Submission API (the dashboard address, ``http://HEAD:8265``).

``submit`` validates the configuration here, then ships segpipe's code (``pipeline``,
``models``, ``jobs``) and the configuration as a YAML spec in the job's ``working_dir``; the
entrypoint is ``python -m jobs.cli run --spec segpipe-job.yaml``. The runtime_env holds nothing
else: no environment variables, hence no credentials. The cluster's nodes read object
storage with their own (instance profile, service account, their environment).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.config import RunConfig, join_spec
from pipeline.errors import InputError

SPEC_NAME = "segpipe-job.yaml"
_PACKAGES = ("pipeline", "models", "jobs")
_FINISHED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
_POLL_SECONDS = 1.0


def client(address: str | None) -> JobSubmissionClient:
    """A client of the cluster at ``address`` (default: ``RAY_ADDRESS``), sending the Ray auth
    token when one is available, as ``ray.init(address=...)`` does."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        pass
    else:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError) as error:
        raise InputError(f"cannot reach a Ray cluster's job API at {address or '$RAY_ADDRESS'}: {error}") from None


def submit(address: str | None, configs: list[RunConfig]) -> str:
    """Submit ``segpipe run`` with the runs ``configs`` (one job spec); returns the job's submission id."""
    source = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="segpipe-submit-") as staging:
        for package in _PACKAGES:
            shutil.copytree(source / package, Path(staging) / package, ignore=shutil.ignore_patterns("__pycache__"))
        (Path(staging) / SPEC_NAME).write_text(yaml.safe_dump(join_spec(configs)))
        return client(address).submit_job(
            entrypoint=f"python -m jobs.cli run --spec {SPEC_NAME}",
            runtime_env={"working_dir": staging},
            metadata={
                "segpipe_models": ",".join(config.model for config in configs),
                "segpipe_run_date": configs[0].run_date.isoformat(),
            },
        )


def follow(address: str | None, job_id: str) -> int:
    """Stream the job's logs to stdout until it ends; returns its exit code (non-zero unless it succeeded)."""

    jobs = client(address)

    async def stream() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(stream())
    while (info := jobs.get_job_info(job_id)).status not in _FINISHED:
        time.sleep(_POLL_SECONDS)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    return info.driver_exit_code or 1


def describe(address: str | None, job_id: str) -> str:
    """A few lines on the job: status, its message, entrypoint and times."""
    info = client(address).get_job_info(job_id)
    lines = [f"job {job_id}: {info.status.value}"]
    if info.message:
        lines.append(f"  message     {info.message}")
    lines.append(f"  entrypoint  {info.entrypoint}")
    if info.metadata:
        lines.append("  metadata    " + ", ".join(f"{key}={value}" for key, value in sorted(info.metadata.items())))
    if info.start_time:
        lines.append(f"  started     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.start_time / 1000))}")
    if info.end_time:
        lines.append(f"  ended       {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.end_time / 1000))}")
    if info.driver_exit_code is not None:
        lines.append(f"  exit code   {info.driver_exit_code}")
    return "\n".join(lines)


def logs(address: str | None, job_id: str) -> str:
    return client(address).get_job_logs(job_id)
