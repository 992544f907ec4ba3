#!/usr/bin/env python3
"""Submit ``sia-gen`` to a running Ray cluster as a Ray job, resumably.

The submission id is derived from the dataset spec (everything that decides which images
the dataset holds, not how many workers make them), so submitting the same spec again
finds the earlier job instead of starting a second writer on the same root:

* a job of that spec still pending or running: nothing is submitted (``--wait`` follows it);
* one that succeeded: nothing is submitted, the dataset is finished;
* only failed or stopped ones: a new attempt ``<id>-r<N>`` is submitted, and ``sia-gen``
  over the same ``--out`` root redoes only the shards that are missing.

Credentials are never sent with the job (the runtime env is visible in the dashboard): the
cluster's nodes get S3 credentials from their own configuration (instance role, a
Kubernetes Secret, ``~/.aws``).

Example::

    python jobs/submit_ray_job.py --address http://head:8265 --categories all \\
        --strengths 0.1:0.2 --per-category 10000 --shard-size 1000 \\
        --out s3://bucket/sia-v1 --workers 16 --gpus-per-worker 1 --wait
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from sia_pipeline.format.genspec import PlanError, parse_strengths
from sia_pipeline.gen.options import DATASET, SCHEDULING_OPTIONS

log = logging.getLogger("submit_ray_job")

REPO_ROOT = Path(__file__).resolve().parents[1]
ID_PREFIX = "sia-gen-"
# Left out of the working-dir upload: environments, data and build outputs.
DEFAULT_EXCLUDES = [
    ".git",
    ".venv",
    "**/__pycache__",
    "*.egg-info",
    "sia-data",
    "bench/results",
]
ACTIVE = {"PENDING", "RUNNING"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|SESSION", re.IGNORECASE)


@dataclass(frozen=True)
class JobSpec:
    """The ``sia-gen`` arguments that define a dataset: equal specs make equal datasets.

    The options and defaults are sia-gen's own (:mod:`sia_pipeline.gen.options`); the
    strengths count by their canonical spelling, as sia-gen's spec hash does.
    """

    categories: str
    strengths: str
    per_category: int
    shard_size: int
    out: str
    seed: int
    extra: tuple[str, ...] = ()

    def args(self) -> list[str]:
        return [
            "--categories",
            self.categories,
            "--strengths",
            self.strengths,
            "--per-category",
            str(self.per_category),
            "--shard-size",
            str(self.shard_size),
            "--out",
            self.out,
            "--seed",
            str(self.seed),
            *self.extra,
        ]


@dataclass(frozen=True)
class Scheduling:
    """How the job runs on the cluster: may change between attempts of one dataset."""

    workers: int
    gpus_per_worker: float
    ray_address: str = "auto"
    extra: tuple[str, ...] = field(default=())

    def args(self) -> list[str]:
        out = ["--ray-address", self.ray_address, "--workers", str(self.workers)]
        if self.gpus_per_worker > 0:
            out += ["--gpus-per-worker", f"{self.gpus_per_worker:g}"]
        return out + list(self.extra)


def split_extra(extra: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split pass-through ``sia-gen`` args into (spec args, scheduling args)."""
    spec: list[str] = []
    sched: list[str] = []
    i = 0
    while i < len(extra):
        arg = extra[i]
        name = arg.split("=", 1)[0]
        target = sched if name in SCHEDULING_OPTIONS else spec
        target.append(arg)
        takes_value = "=" not in arg and i + 1 < len(extra) and not extra[i + 1].startswith("--")
        if name.startswith("--") and takes_value:
            target.append(extra[i + 1])
            i += 1
        i += 1
    return tuple(spec), tuple(sched)


def submission_id(spec: JobSpec) -> str:
    """``sia-gen-`` + 16 hex of the sha256 of the canonical spec: stable across machines."""
    canonical = json.dumps(
        {
            "categories": spec.categories,
            "strengths": parse_strengths(spec.strengths).text,
            "per_category": spec.per_category,
            "shard_size": spec.shard_size,
            "out": spec.out.rstrip("/"),
            "seed": spec.seed,
            "extra": list(spec.extra),
        },
        sort_keys=True,
    )
    return ID_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def entrypoint(gen_command: str, spec: JobSpec, sched: Scheduling) -> str:
    """The shell command the job runs: ``sia-gen`` (or ``gen_command``) with all arguments."""
    return shlex.join([*shlex.split(gen_command), *spec.args(), *sched.args()])


def parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    """``NAME=VALUE`` pairs for the job's env; credential-looking names are refused."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            msg = f"--env {pair!r}: expected NAME=VALUE"
            raise click.BadParameter(msg)
        if _SECRET_NAME.search(name):
            msg = (
                f"--env {name}: credentials are not sent with a Ray job (the dashboard shows "
                "the runtime env); give the cluster's nodes their own S3 credentials"
            )
            raise click.BadParameter(msg)
        env[name] = value
    return env


def runtime_env(working_dir: Path | None, env: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if working_dir is not None:
        out["working_dir"] = str(working_dir)
        out["excludes"] = list(DEFAULT_EXCLUDES)
    if env:
        out["env_vars"] = dict(env)
    return out


def attempt_of(job_id: str, base: str) -> int:
    """0 for ``base`` itself, N for ``base-rN``, -1 for another spec's job."""
    if job_id == base:
        return 0
    m = re.fullmatch(re.escape(base) + r"-r(\d+)", job_id)
    return int(m.group(1)) if m else -1


@dataclass(frozen=True)
class Decision:
    """What to do about a spec given the cluster's jobs: ``submit``, ``running`` or ``done``."""

    action: str
    submission_id: str
    reason: str


def decide(base: str, jobs: dict[str, str], rerun_finished: bool = False) -> Decision:
    """Pick the action from ``{submission_id: status}`` of the cluster's jobs."""
    mine = {j: s for j, s in jobs.items() if attempt_of(j, base) >= 0}
    if not mine:
        return Decision("submit", base, "no earlier job for this spec")
    latest = max(mine, key=lambda j: attempt_of(j, base))
    active = sorted(j for j, s in mine.items() if s in ACTIVE)
    if active:
        return Decision("running", active[-1], f"job {active[-1]} is {mine[active[-1]]}")
    succeeded = sorted(j for j, s in mine.items() if s == "SUCCEEDED")
    nxt = f"{base}-r{attempt_of(latest, base) + 1}"
    if succeeded and not rerun_finished:
        return Decision("done", succeeded[-1], f"job {succeeded[-1]} already SUCCEEDED")
    return Decision("submit", nxt, f"latest attempt {latest} ended {mine[latest]}; resuming")


def _server_error(address: str, err: Exception) -> click.ClickException:
    """One line naming the job server; a hint when it wants a token we did not send."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "Authentication" in type(err).__name__ or "Authentication required" in text:
        text = (
            "it requires token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "(or ~/.ray/auth_token) to the cluster's token"
        )
    return click.ClickException(f"Ray job server at {address}: {text}")


def _server_errors() -> tuple[type[Exception], ...]:
    from ray.exceptions import RayError

    return (ConnectionError, RuntimeError, RayError)  # RayError: AuthenticationError


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except _server_errors() as e:
        raise _server_error(address, e) from None


def _job_statuses(client) -> dict[str, str]:
    return {
        j.submission_id: str(getattr(j.status, "value", j.status))
        for j in client.list_jobs()
        if j.submission_id
    }


def submit(
    client, spec: JobSpec, sched: Scheduling, gen_command: str, renv: dict, rerun: bool
) -> Decision:
    """Submit (or find) the job for ``spec``; a lost race on the id is treated as found."""
    base = submission_id(spec)
    decision = decide(base, _job_statuses(client), rerun)
    if decision.action != "submit":
        return decision
    try:
        client.submit_job(
            entrypoint=entrypoint(gen_command, spec, sched),
            submission_id=decision.submission_id,
            runtime_env=renv,
            metadata={"sia_spec_id": base, "sia_out": spec.out},
        )
    except RuntimeError as e:
        if "already exists" not in str(e):
            raise
        # Another submitter used this id between our listing and our submit.
        return Decision("running", decision.submission_id, "submitted concurrently elsewhere")
    return decision


def _check_strengths(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """sia-gen's own parser: a spelling it refuses is refused here (exit 2)."""
    try:
        parse_strengths(value)
    except PlanError as e:
        raise click.BadParameter(str(e)) from None
    return value


def wait_for(client, job_id: str, poll_s: float = 2.0) -> str:
    """Poll until the job ends; returns its final status."""
    last = None
    while True:
        status = str(getattr(client.get_job_status(job_id), "value", ""))
        if status != last:
            log.info("job %s: %s", job_id, status)
            last = status
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    epilog="Arguments after `--` go to sia-gen unchanged (e.g. -- --sampler ddim --steps 50); "
    f"all but {'/'.join(sorted(SCHEDULING_OPTIONS))} count as spec.",
)
@click.option("--address", default="http://127.0.0.1:8265", help="Ray job server (dashboard).")
@click.option("--categories", default=DATASET.categories, help="sia-gen --categories.")
@click.option(
    "--strengths", default=DATASET.strengths, callback=_check_strengths, help="sia-gen --strengths."
)
@click.option(
    "--per-category",
    type=click.IntRange(min=1),
    default=DATASET.per_category,
    help="Images/category.",
)
@click.option(
    "--shard-size", type=click.IntRange(min=1), default=DATASET.shard_size, help="Images per shard."
)
@click.option("--out", required=True, help="Dataset root (s3://bucket/prefix) seen by the nodes.")
@click.option("--seed", type=int, default=DATASET.seed, help="Global seed.")
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, help="Sampling actors (one per GPU)."
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(min=0),
    default=1.0,
    help="GPUs per sampling actor; 0 = CPU actors.",
)
@click.option(
    "--working-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=REPO_ROOT,
    help="Uploaded as the job's working dir (.venv, .git, sia-data excluded).",
)
@click.option("--no-working-dir", is_flag=True, help="Upload nothing; the image has the code.")
@click.option("--env", "env_pairs", multiple=True, help="NAME=VALUE for the job (not secrets).")
@click.option("--gen-command", default="sia-gen", help="Command that runs generation.")
@click.option("--wait/--no-wait", default=False, help="Follow the job until it ends.")
@click.option("--rerun-finished", is_flag=True, help="Submit a new attempt even if one succeeded.")
@click.option("--dry-run", is_flag=True, help="Print id, entrypoint and runtime env; submit none.")
@click.argument("gen_args", nargs=-1, type=click.UNPROCESSED)
def main(
    address: str,
    categories: str,
    strengths: str,
    per_category: int,
    shard_size: int,
    out: str,
    seed: int,
    workers: int,
    gpus_per_worker: float,
    working_dir: Path,
    no_working_dir: bool,
    env_pairs: tuple[str, ...],
    gen_command: str,
    wait: bool,
    rerun_finished: bool,
    dry_run: bool,
    gen_args: tuple[str, ...],
) -> None:
    """Submit `sia-gen` as a Ray job whose id is derived from the dataset spec.

    Resubmitting the same spec never starts a second writer: a running job is left alone,
    a succeeded one means the dataset is done, a failed one gets a new attempt that
    resumes the same dataset.

    Exit status: 0 submitted, running or done (with --wait: the job succeeded); 1 the
    followed job failed, or the job server is unreachable or refused us; 2 bad options.
    On a cluster with token auth, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec_extra, sched_extra = split_extra(gen_args)
    spec = JobSpec(categories, strengths, per_category, shard_size, out, seed, spec_extra)
    sched = Scheduling(workers, gpus_per_worker, extra=sched_extra)
    renv = runtime_env(None if no_working_dir else working_dir.resolve(), parse_env(env_pairs))
    if dry_run:
        plan = {
            "submission_id": submission_id(spec),
            "entrypoint": entrypoint(gen_command, spec, sched),
            "runtime_env": renv,
        }
        click.echo(json.dumps(plan, indent=2))
        return
    client = _client(address)
    try:
        decision = submit(client, spec, sched, gen_command, renv, rerun_finished)
    except _server_errors() as e:
        raise _server_error(address, e) from None
    verb = {"submit": "submitted", "running": "already running", "done": "already finished"}
    click.echo(f"{verb[decision.action]}: {decision.submission_id} ({decision.reason})")
    if not wait or decision.action == "done":
        return
    try:
        status = wait_for(client, decision.submission_id)
        click.echo(client.get_job_logs(decision.submission_id), nl=False)
    except _server_errors() as e:
        raise _server_error(address, e) from None
    click.echo(f"{decision.submission_id}: {status}")
    if status != "SUCCEEDED":
        sys.exit(1)


if __name__ == "__main__":
    main()
