"""The sampling worker: loads a model once, turns one :class:`ShardTask` into one stored shard.

A plain class (no Ray here; ``runner`` wraps it in an actor), so tests can call it directly.
Inside a shard, PNG/JPEG encoding of one batch runs on a helper thread while the next
batch samples; the sampling lock is released before the last batch's encode and the
upload, so a second in-flight task samples while the first one's tar goes to storage
and the sampler (a GPU) never waits on PNG or upload. Tars are written into a
node-local spill (:mod:`sia_pipeline.gen.spill`): a failed upload keeps the shard
there and the retry only uploads.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sia_pipeline.format.v1 import ShardStats
from sia_pipeline.format.writer import ShardTarWriter, encode_image
from sia_pipeline.gen.plan import ShardTask
from sia_pipeline.gen.spill import DEFAULT_SPILL_BYTES, Spill
from sia_pipeline.io.storage import open_storage

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    """What a worker reports for one shard; failures are values, not exceptions.

    ``sampled`` says whether this attempt ran the sampler (False: a spilled copy was
    uploaded); ``spilled`` that a failed upload left the shard in the node's spill, so
    a retry on ``node_id`` uploads it without sampling again.
    """

    shard_id: str
    ok: bool
    count: int = 0
    sha256: str = ""
    error: str = ""
    seconds: float = 0.0
    sampled: bool = False
    spilled: bool = False
    node_id: str = ""


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


ProgressFn = Callable[[str, int, str], None]


class SamplerWorker:
    """Holds one loaded model and writes whole shards to the output root.

    Args:
        model_url: model folder or ``s3://`` URL; None = the bundled demo model.
        out_url: dataset root (local folder or ``s3://bucket/prefix``).
        endpoint_url: S3 endpoint override (MinIO, Ceph, the test server).
        device: ``cpu`` or ``cuda``; None picks CUDA when this process sees a GPU.
        threads: torch intra-op threads (None leaves torch's default).
        spill_dir: node-local folder for shards whose upload failed (None: the default
            under the node's temp directory, see :mod:`sia_pipeline.gen.spill`).
        spill_bytes: most bytes kept in the spill.
        progress: called as ``progress(tag, images_sampled, phase)`` when a task starts
            and after each batch (the runner passes a Ray-actor sink).
        classifier_url: classifier folder for guided tasks (None: unguided tasks only).
        compile: ``torch.compile`` the UNet (and classifier) of every sampler; every batch
            is then padded to the task's batch size (one shape, compiled once).
        warmup: a task whose sampler is built and run once on a throw-away batch here,
            before the first task and outside the sampling lock (on CUDA or with
            ``compile``; the compile and cuDNN autotuning happen then).
    """

    def __init__(
        self,
        model_url: str | None,
        out_url: str,
        endpoint_url: str | None = None,
        device: str | None = None,
        threads: int | None = None,
        spill_dir: str | None = None,
        spill_bytes: int = DEFAULT_SPILL_BYTES,
        progress: ProgressFn | None = None,
        classifier_url: str | None = None,
        compile: bool = False,
        warmup: ShardTask | None = None,
    ) -> None:
        import torch
        from diffusers.utils import logging as dlogging

        from sia_pipeline.diffusion.model import load_model

        dlogging.set_verbosity_error()
        if threads:
            torch.set_num_threads(threads)
        import cv2

        cv2.setNumThreads(1)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model = load_model(model_url, device=device, endpoint_url=endpoint_url)
        self.storage = open_storage(out_url, endpoint_url)
        self.spill = Spill(spill_dir, spill_bytes)
        self.spill.sweep()  # parts left by killed workers on this node
        self.progress = progress
        self.compile = compile
        self.classifier = None
        if classifier_url:
            from sia_pipeline.diffusion.classifier import load_classifier

            self.classifier = load_classifier(classifier_url, device, endpoint_url)
        self._samplers: dict[tuple[str, int, float], object] = {}
        self._sample_lock = threading.Lock()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sia-encode")
        if warmup is not None and (compile or torch.device(device).type == "cuda"):
            seconds = self._sampler(warmup).warm_up(
                warmup.category, warmup.batch_size, warmup.strengths[0]
            )
            log.info("warmed up in %.1f s (batch %d)", seconds, warmup.batch_size)

    def ping(self) -> str:
        """Cheap call that returns once the model is loaded (the runner's readiness check)."""
        return self.model.model_id

    def info(self) -> dict[str, Any]:
        """Where this worker runs: pid, host, device and the GPUs it may see."""
        return {
            "model_id": self.model.model_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": self.device,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def sweep(self) -> int:
        """Clear parts of dead processes from this node's spill (the runner calls it at the end)."""
        return self.spill.sweep()

    def _report(self, tag: str, images: int, phase: str) -> None:
        if self.progress is not None and tag:
            try:
                self.progress(tag, images, phase)
            except Exception:  # progress is best effort; the shard is what counts
                log.debug("progress report failed", exc_info=True)

    def _sampler(self, task: ShardTask):
        from sia_pipeline.diffusion.sampler import Sampler

        key = (
            task.sampler,
            task.steps,
            task.eta,
            task.classifier_scale,
            task.precision,
            task.strength_min_t,
        )
        if key not in self._samplers:
            guidance = None
            if task.classifier_id:
                from sia_pipeline.diffusion.guidance import ClassifierGuidance

                module, card = self.classifier or (None, {})
                held = card.get("classifier_id")
                if held != task.classifier_id:
                    msg = f"task wants classifier {task.classifier_id}, this worker holds {held}"
                    raise ValueError(msg)
                guidance = ClassifierGuidance(module, task.classifier_scale, task.classifier_id)
            self._samplers[key] = Sampler(
                self.model,
                task.sampler,
                task.steps,
                task.eta,
                guidance=guidance,
                precision=task.precision,
                compile=self.compile,
                strength_min_t=task.strength_min_t,
            )
        return self._samplers[key]

    def _encode_batch(
        self, writer: ShardTarWriter, task: ShardTask, first: int, images: np.ndarray
    ) -> None:
        for j, image in enumerate(images, start=first):
            row = task.sample_row(j)
            meta = {k: v for k, v in row.items() if k not in ("key", "shard")}
            data = encode_image(image, task.image_format)
            writer.write(row["key"], data, task.image_format, meta)

    def _sample_to(self, task: ShardTask, path: Path, tag: str) -> tuple[int, str]:
        """Sample and encode ``task`` into a tar at ``path``; returns (size, sha256).

        Batch k+1 samples while batch k is encoded on the helper thread; the sampling
        lock is released before the last encode, the tar's close and the upload.
        """
        writer = ShardTarWriter(path)
        pending: Future | None = None
        try:
            with self._sample_lock:
                self._report(tag, 0, "sample")
                sampler = self._sampler(task)
                # compiled: one shape, the tail batch filled with throw-away samples
                pad = {"pad_to": task.batch_size} if self.compile else {}
                for first in range(0, task.count, task.batch_size):
                    last = min(first + task.batch_size, task.count)
                    images = sampler.sample(
                        [task.category] * (last - first),
                        task.strengths[first:last],
                        task.seeds[first:last],
                        **pad,
                    )
                    if pending is not None:
                        pending.result()  # keeps order and at most one batch queued
                    pending = self._encoder.submit(self._encode_batch, writer, task, first, images)
                    self._report(tag, last, "sample")
            if pending is not None:
                pending.result()
            return writer.close()
        except BaseException:
            if pending is not None and not pending.cancel():
                pending.exception()  # let a running encode finish before closing its tar
            writer.abort()
            path.unlink(missing_ok=True)
            raise

    def __call__(self, task: ShardTask, tag: str = "") -> ShardResult:
        """Store one shard (tar first, then its stats JSON), sampling it unless spilled.

        A spilled copy of this shard on this node (from an earlier failed upload) is
        uploaded as it is; a failed upload leaves the freshly sampled shard in the spill.
        """
        t0 = time.perf_counter()
        if task.model_id != self.model.model_id:
            msg = f"task wants model {task.model_id}, this worker holds {self.model.model_id}"
            return ShardResult(task.shard_id, ok=False, error=msg)
        found = self.spill.find(task)
        part: Path | None = None
        if found is not None:
            tar, stats_json = found
            self._report(tag, task.count, "upload")
            log.info("shard %s: uploading the spilled copy (no sampling)", task.shard_id)
        else:
            part = tar = self.spill.part_path(task)
            try:
                size, sha256 = self._sample_to(task, part, tag)
            except Exception as e:  # reported to the driver, which retries the shard
                log.exception("shard %s failed", task.shard_id)
                return ShardResult(task.shard_id, ok=False, error=_one_line(e), sampled=True)
            stats_json = self._stats(task, size, sha256).to_json()
        sampled = part is not None
        try:
            self.storage.put_file(tar, task.tar_name)
            self.storage.put_bytes(stats_json, task.stats_name)
        except Exception as e:
            log.warning("shard %s: upload failed: %s", task.shard_id, _one_line(e))
            spilled = self.spill.keep(task, part, stats_json) if sampled else True
            error = f"upload: {_one_line(e)}"
            return ShardResult(task.shard_id, False, error=error, sampled=sampled, spilled=spilled)
        finally:
            if part is not None:
                part.unlink(missing_ok=True)  # moved into the spill, or uploaded
        if not sampled:
            self.spill.drop(task)
        sha = ShardStats.from_json(stats_json).sha256
        dt = time.perf_counter() - t0
        return ShardResult(task.shard_id, True, task.count, sha, seconds=dt, sampled=sampled)

    def _stats(self, task: ShardTask, size: int, sha256: str) -> ShardStats:
        rows = [task.sample_row(j) for j in range(task.count)]
        return ShardStats(
            shard=task.shard_id,
            category=task.category,
            tar=task.tar_name,
            count=task.count,
            size=size,
            sha256=sha256,
            keys=[r["key"] for r in rows],
            strength_min=min(task.strengths),
            strength_max=max(task.strengths),
            spec_hash=task.spec_hash,
            samples=rows,
        )
