"""A long sia-gen run to loopback S3 through injected faults: memory, throughput, resampling.

Starts a moto S3 server and the test suite's seeded fault proxy (``tests/fault_proxy.py``)
in front of it, makes a tiny untrained model (32 px), starts one local Ray, then runs
``sia-gen --ray-address`` (joining that Ray) as a program:

1. a fault-free run of ``--clean-images`` images (the throughput reference);
2. the soak: ``--images`` images with ``--rate`` faults of ``--mode`` injected, while the
   driver's and the sampling actors' RSS is sampled every ``--sample-every`` seconds;
3. with ``--table``: one short run (``--table-images``) per fault mode at ``--rate``, and one
   at 100 % (expected to stop with one line, exit 1) followed by a rerun after the fault clears.

Every finished dataset is checked: each shard tar's sha256 (read straight from the server,
not through the proxy) equals the sha256 recorded in ``index.json``, and shards that the
clean run also wrote are bit-identical to it. Re-uploads and re-samplings come from sia-gen's
summary line. Writes ``bench/results/sia_gen_soak.json`` and ``.md``.

    nice python bench/sia_gen_soak.py --images 2000 --table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fault_proxy import MODES, FaultProxy  # noqa: E402
from local_servers import start_moto  # noqa: E402

CATEGORIES = {"bottle": 0, "magnetic_tile": 1}
SUMMARY_RE = re.compile(
    r"(?P<shards>\d+) shards \((?P<images>\d+) images\) written .* at (?P<ips>[\d.]+) images/s"
    r" \((?P<secs>[\d.]+) s in all\).*retries (?P<retries>\d+), actors lost (?P<lost>\d+),"
    r" re-uploads (?P<reuploads>\d+), re-samplings (?P<resamplings>\d+)"
)


def _rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` from /proc (Linux), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid``."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p:
                todo.append(child)
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0].decode()
                except OSError:
                    continue
                out.append((child, cmd))
    return out


class RssSampler:
    """Samples the RSS (MiB) of a driver process and of the sampling actors (``ray::RayWorker``
    processes below ``cluster_pid``: the process that started Ray)."""

    def __init__(self, pid: int, every: float, cluster_pid: int) -> None:
        self.pid = pid
        self.cluster_pid = cluster_pid
        self.every = every
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            driver = _rss_mib(self.pid)
            if driver is None:
                return
            actors = {}
            for child, cmd in _descendants(self.cluster_pid):
                if cmd.startswith("ray::RayWorker"):  # the sampling actors
                    rss = _rss_mib(child)
                    if rss is not None:
                        actors[str(child)] = rss
            self.samples.append(
                {
                    "t": round(time.perf_counter() - self._t0, 1),
                    "driver_mib": driver,
                    "actors_mib": actors,
                }
            )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Harness:
    def __init__(self, args, work: Path) -> None:
        self.args = args
        self.work = work
        self.moto, self.upstream = start_moto(timeout_s=60)
        self.proxy = FaultProxy(self.upstream, rate=0.0, seed=args.seed, latency_s=0.2).start()
        self.s3 = boto3.client("s3", endpoint_url=self.upstream)
        from sia_pipeline.diffusion.model import init_model

        self.model = work / "tiny-model"
        init_model(self.model, CATEGORIES, preset="test", seed=0)
        self.runs = 0
        # One Ray for every run (started here, so its processes are ours and end with us):
        # each sia-gen joins it instead of paying a local Ray start.
        import ray

        ray.init(
            address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False
        )
        self.ray_address = ray.get_runtime_context().gcs_address

    def close(self) -> None:
        import ray

        ray.shutdown()
        self.proxy.stop()
        self.moto.terminate()
        self.moto.wait(timeout=10)

    def new_root(self) -> str:
        self.runs += 1
        bucket = f"soak-{self.runs:02d}-{os.getpid()}"
        self.s3.create_bucket(Bucket=bucket)
        return f"s3://{bucket}/sia"

    def gen(self, root: str, images: int, sample_rss: bool = False, timeout: float = 900) -> dict:
        a = self.args
        per_category = images // len(CATEGORIES)
        cmd = [
            sys.executable,
            "-m",
            "sia_pipeline.cli.gen",
            "--model",
            str(self.model),
            "--out",
            root,
            "--categories",
            ",".join(CATEGORIES),
            "--per-category",
            str(per_category),
            "--shard-size",
            str(a.shard_size),
            "--batch-size",
            str(a.batch_size),
            "--steps",
            str(a.steps),
            "--workers",
            str(a.workers),
            "--ray-address",
            self.ray_address,
            "--no-progress",
        ]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "AWS_ENDPOINT_URL": self.proxy.url,
            "AWS_ACCESS_KEY_ID": "soak",
            "AWS_SECRET_ACCESS_KEY": "soak-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
        }
        faults_before = sum(self.proxy.counts.values())
        requests_before = self.proxy.requests
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        sampler = RssSampler(proc.pid, a.sample_every, os.getpid()) if sample_rss else None
        if sampler:
            sampler.__enter__()
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        finally:
            if sampler:
                sampler.__exit__(None, None, None)
        wall = time.perf_counter() - t0
        run = {
            "images_asked": per_category * len(CATEGORIES),
            "exit": proc.returncode,
            "wall_s": round(wall, 1),
            "requests": self.proxy.requests - requests_before,
            "faults": sum(self.proxy.counts.values()) - faults_before,
            "stderr_tail": err.strip().splitlines()[-3:],
            "traceback": "Traceback" in err,
        }
        m = SUMMARY_RE.search(out)
        if m:
            run.update(
                images=int(m["images"]),
                shards=int(m["shards"]),
                images_per_s=float(m["ips"]),
                gen_s=float(m["secs"]),
                retries=int(m["retries"]),
                actors_lost=int(m["lost"]),
                reuploads=int(m["reuploads"]),
                resamplings=int(m["resamplings"]),
            )
        if sampler:
            run["rss"] = sampler.samples
        return run

    def verify(self, root: str) -> dict[str, str]:
        """{tar: sha256} read straight from the server, checked against index.json."""
        bucket, _, prefix = root.removeprefix("s3://").partition("/")

        def get(rel: str) -> bytes:
            return self.s3.get_object(Bucket=bucket, Key=f"{prefix}/{rel}")["Body"].read()

        index = json.loads(get("index.json"))
        got = {s["tar"]: sha(get(s["tar"])) for s in index["shards"]}
        bad = [s["tar"] for s in index["shards"] if got[s["tar"]] != s["sha256"]]
        if bad:
            msg = f"{root}: shards differ from index.json: {bad[:5]}"
            raise RuntimeError(msg)
        return got


def rss_summary(samples: list[dict]) -> dict:
    """Medians of the first and last quarter of the steady part (all actors up) of a run."""
    if not samples:
        return {"samples": 0}
    n_actors = max(len(s["actors_mib"]) for s in samples)
    start = next(i for i, s in enumerate(samples) if len(s["actors_mib"]) == n_actors)
    steady = samples[start:]
    q = max(1, len(steady) // 4)
    driver = [s["driver_mib"] for s in steady]
    actors = [sum(s["actors_mib"].values()) for s in steady]
    # the actors' first quarter includes their warm-up (model load, first batches): the
    # second quarter against the last one is what says "flat"
    return {
        "samples": len(samples),
        "steady_samples": len(steady),
        "steady_from_s": steady[0]["t"],
        "steady_to_s": steady[-1]["t"],
        "actors": n_actors,
        "driver_mib_first_quarter_median": statistics.median(driver[:q]),
        "driver_mib_last_quarter_median": statistics.median(driver[-q:]),
        "driver_mib_max": max(driver),
        "actors_mib_first_quarter_median": round(statistics.median(actors[:q]), 1),
        "actors_mib_second_quarter_median": round(statistics.median(actors[q : 2 * q]), 1),
        "actors_mib_last_quarter_median": round(statistics.median(actors[-q:]), 1),
        "actors_mib_max": round(max(actors), 1),
    }


def run_soak(h: Harness, args) -> dict:
    """The clean reference run, then the long run with faults and RSS sampling."""
    clean_root = h.new_root()
    clean = h.gen(clean_root, args.clean_images)
    clean_shas = h.verify(clean_root) if clean["exit"] == 0 else {}
    print(f"clean: {clean}", flush=True)
    h.proxy.set(mode=args.mode, rate=args.rate)
    soak_root = h.new_root()
    soak = h.gen(soak_root, args.images, sample_rss=True, timeout=1800)
    h.proxy.set(rate=0.0)
    soak_shas = h.verify(soak_root) if soak["exit"] == 0 else {}
    common = sorted(set(clean_shas) & set(soak_shas))
    soak["verified_shards"] = len(soak_shas)
    soak["common_with_clean"] = len(common)
    soak["common_identical"] = sum(clean_shas[k] == soak_shas[k] for k in common)
    soak["rss_summary"] = rss_summary(soak.get("rss", []))
    soak["fault_counts"] = dict(h.proxy.counts)
    print(f"soak: { {k: v for k, v in soak.items() if k != 'rss'} }", flush=True)
    return {"clean": clean, "soak": soak}


def run_table(h: Harness, args) -> list[dict]:
    """One short run per fault mode at ``args.rate``, one at 100 % and its rerun; clean runs
    first and last (a shared machine's load drifts: "clean" is their mean)."""
    table = []
    ref_root = h.new_root()
    ref = h.gen(ref_root, args.table_images)
    ref_shas = h.verify(ref_root) if ref["exit"] == 0 else {}
    table.append({"mode": "none", "rate": 0.0, **ref, "identical": True})
    for mode in (*MODES, "mix"):
        h.proxy.set(mode=mode, rate=args.rate)
        root = h.new_root()
        run = h.gen(root, args.table_images)
        h.proxy.set(rate=0.0)
        run["identical"] = run["exit"] == 0 and h.verify(root) == ref_shas
        table.append({"mode": mode, "rate": args.rate, **run})
        print(f"table {mode}: exit {run['exit']} in {run['wall_s']} s", flush=True)
    h.proxy.set(mode="internal", rate=1.0)
    root = h.new_root()
    down = h.gen(root, args.table_images, timeout=600)
    h.proxy.set(rate=0.0)
    table.append({"mode": "internal", "rate": 1.0, **down, "identical": None})
    rerun = h.gen(root, args.table_images)
    rerun["identical"] = rerun["exit"] == 0 and h.verify(root) == ref_shas
    table.append({"mode": "rerun after 100 %", "rate": 0.0, **rerun})
    ref2_root = h.new_root()
    ref2 = h.gen(ref2_root, args.table_images)
    ref2["identical"] = ref2["exit"] == 0 and h.verify(ref2_root) == ref_shas
    table.append({"mode": "none (again)", "rate": 0.0, **ref2})
    clean_s = (ref["wall_s"] + ref2["wall_s"]) / 2
    for row in table:
        row["time_vs_clean"] = round(row["wall_s"] / clean_s, 2)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="images in the soak run")
    ap.add_argument("--clean-images", type=int, default=400, help="images in the clean run")
    ap.add_argument("--table", action="store_true", help="also run the per-mode fault table")
    ap.add_argument(
        "--table-only", action="store_true", help="only the table, into an earlier result"
    )
    ap.add_argument("--table-images", type=int, default=200)
    ap.add_argument("--mode", default="mix", choices=(*MODES, "mix"))
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-every", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--from-json", type=Path, help="only re-render the markdown of a result")
    args = ap.parse_args()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        result["soak"]["rss_summary"] = rss_summary(result["soak"].get("rss", []))
        args.from_json.write_text(json.dumps(result, indent=1))
        (args.out / "sia_gen_soak.md").write_text(markdown(result))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up moto, Ray, temp files
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "soak")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "soak-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    work = Path(tempfile.mkdtemp(prefix="sia-soak-"))
    h = Harness(args, work)
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if args.table_only:  # keep the clean and soak runs of an earlier result
        result = {**json.loads((args.out / "sia_gen_soak.json").read_text()), "table": []}
        result["args"].update(table=True, table_images=args.table_images)
    try:
        h.gen(h.new_root(), args.table_images)  # warm-up: caches, the cluster's workers
        if not args.table_only:
            result.update(run_soak(h, args))
        if args.table or args.table_only:
            result["table"] = run_table(h, args)
    finally:
        h.close()
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sia_gen_soak.json").write_text(json.dumps(result, indent=1))
    (args.out / "sia_gen_soak.md").write_text(markdown(result))
    print((args.out / "sia_gen_soak.md").read_text())


def markdown(r: dict) -> str:
    a, clean, soak = r["args"], r["clean"], r["soak"]
    rs = soak.get("rss_summary", {})
    lines = [
        "# sia-gen soak: loopback S3 (moto) through the fault proxy",
        "",
        f"Tiny untrained 32 px model, {a['steps']} steps, {a['workers']} CPU workers, shard size"
        f" {a['shard_size']}, batch {a['batch_size']}; {r['machine']['cpus']} CPUs (shared).",
        f"Command: `nice python bench/sia_gen_soak.py --images {a['images']}"
        f"{' --table' if a['table'] else ''}`",
        "",
        "| run | images | exit | wall s | images/s | faults / requests | re-uploads |"
        " re-samplings | retries |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in (("clean", clean), (f"soak ({a['mode']} {a['rate']:.0%})", soak)):
        lines.append(
            f"| {name} | {run.get('images', '-')} | {run['exit']} | {run['wall_s']} |"
            f" {run.get('images_per_s', '-')} | {run['faults']} / {run['requests']} |"
            f" {run.get('reuploads', '-')} | {run.get('resamplings', '-')} |"
            f" {run.get('retries', '-')} |"
        )
    if clean.get("images_per_s") and soak.get("images_per_s"):
        ratio = soak["images_per_s"] / clean["images_per_s"]
        lines += ["", f"Soak throughput vs clean: {ratio:.2f}x."]
    lines += [
        "",
        f"Soak data: {soak.get('verified_shards', 0)} shards match index.json sha256;"
        f" {soak.get('common_identical', 0)}/{soak.get('common_with_clean', 0)} shards also"
        " written by the clean run are bit-identical to it.",
        "",
        f"RSS (MiB) every {a['sample_every']} s, once all {rs.get('actors', '-')} actors were up"
        f" ({rs.get('steady_from_s', '-')} s to {rs.get('steady_to_s', '-')} s of the soak,"
        f" {rs.get('steady_samples', '-')} samples): medians per quarter (the actors' first quarter"
        " is their warm-up).",
        "",
        "| process | first quarter | second quarter | last quarter | max |",
        "|---|---|---|---|---|",
        f"| driver | {rs.get('driver_mib_first_quarter_median', '-')} | - |"
        f" {rs.get('driver_mib_last_quarter_median', '-')} | {rs.get('driver_mib_max', '-')} |",
        f"| actors (sum of {rs.get('actors', '-')}) |"
        f" {rs.get('actors_mib_first_quarter_median', '-')} |"
        f" {rs.get('actors_mib_second_quarter_median', '-')} |"
        f" {rs.get('actors_mib_last_quarter_median', '-')} | {rs.get('actors_mib_max', '-')} |",
        "",
        "RSS over time (MiB; every 5th sample):",
        "",
        "| t s | driver | actors |",
        "|---|---|---|",
        *(
            f"| {x['t']} | {x['driver_mib']} | {', '.join(map(str, sorted(x['actors_mib'].values())))} |"  # noqa: E501
            for x in soak.get("rss", [])[::5]
        ),
        "",
        f"Faults injected in the soak: {soak.get('fault_counts', {})}.",
    ]
    if r.get("table"):
        lines += [
            "",
            f"## Fault table ({a['table_images']} images per run)",
            "",
            "| mode | rate | outcome | exit | wall s | time vs clean | faults / requests |"
            " re-uploads | re-samplings | data |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["table"]:
            if row["exit"] == 0:
                outcome = "completed"
            else:
                last = row["stderr_tail"][-1] if row["stderr_tail"] else ""
                outcome = f"stopped: `{last[:140]}`"
                if row["traceback"]:
                    outcome += " (traceback!)"
            data = {True: "bit-identical", False: "DIFFERS", None: "-"}[row["identical"]]
            lines.append(
                f"| {row['mode']} | {row['rate']:.0%} | {outcome} | {row['exit']} |"
                f" {row['wall_s']} | {row['time_vs_clean']} | {row['faults']} /"
                f" {row['requests']} | {row.get('reuploads', '-')} |"
                f" {row.get('resamplings', '-')} | {data} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
