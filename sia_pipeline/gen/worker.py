"""The sampling worker: loads a model once, turns one :class:`ShardTask` into one stored shard.

A plain class (no Ray here; ``runner`` wraps it in an actor), so tests can call it directly.
Inside a shard, PNG/JPEG encoding of one batch runs on a helper thread while the next
batch samples; the sampling lock is released before the upload, so a second in-flight
task can sample while the first one's tar goes to storage.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sia_pipeline.dataset.format import ShardStats
from sia_pipeline.dataset.storage import open_storage
from sia_pipeline.dataset.writer import ShardTarWriter, encode_image
from sia_pipeline.gen.plan import ShardTask

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    """What a worker reports for one shard; failures are values, not exceptions."""

    shard_id: str
    ok: bool
    count: int = 0
    sha256: str = ""
    error: str = ""
    seconds: float = 0.0


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class SamplerWorker:
    """Holds one loaded model and writes whole shards to the output root.

    Args:
        model_url: model folder or ``s3://`` URL; None = the bundled demo model.
        out_url: dataset root (local folder or ``s3://bucket/prefix``).
        endpoint_url: S3 endpoint override (MinIO, Ceph, the test server).
        device: ``cpu`` or ``cuda``; None picks CUDA when this process sees a GPU.
        threads: torch intra-op threads (None leaves torch's default).
    """

    def __init__(
        self,
        model_url: str | None,
        out_url: str,
        endpoint_url: str | None = None,
        device: str | None = None,
        threads: int | None = None,
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
        self._samplers: dict[tuple[str, int, float], object] = {}
        self._sample_lock = threading.Lock()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sia-encode")

    def ping(self) -> str:
        """Cheap call that returns once the model is loaded (the runner's readiness check)."""
        return self.model.model_id

    def _sampler(self, task: ShardTask):
        from sia_pipeline.diffusion.sampler import Sampler

        key = (task.sampler, task.steps, task.eta)
        if key not in self._samplers:
            self._samplers[key] = Sampler(self.model, task.sampler, task.steps, task.eta)
        return self._samplers[key]

    def _encode_batch(
        self, writer: ShardTarWriter, task: ShardTask, first: int, images: np.ndarray
    ) -> None:
        for j, image in enumerate(images, start=first):
            row = task.sample_row(j)
            meta = {k: v for k, v in row.items() if k not in ("key", "shard")}
            data = encode_image(image, task.image_format)
            writer.write(row["key"], data, task.image_format, meta)

    def __call__(self, task: ShardTask) -> ShardResult:
        """Sample, encode and store one shard: tar first, then its stats JSON."""
        t0 = time.perf_counter()
        if task.model_id != self.model.model_id:
            msg = f"task wants model {task.model_id}, this worker holds {self.model.model_id}"
            return ShardResult(task.shard_id, ok=False, error=msg)
        tmpdir = tempfile.mkdtemp(prefix="sia-shard-")
        writer = ShardTarWriter(os.path.join(tmpdir, f"{task.shard_id}.tar"))
        pending: Future | None = None
        try:
            with self._sample_lock:
                sampler = self._sampler(task)
                for first in range(0, task.count, task.batch_size):
                    last = min(first + task.batch_size, task.count)
                    images = sampler.sample(
                        [task.category] * (last - first),
                        task.strengths[first:last],
                        task.seeds[first:last],
                    )
                    if pending is not None:
                        pending.result()  # keeps order and at most one batch queued
                    pending = self._encoder.submit(self._encode_batch, writer, task, first, images)
            if pending is not None:
                pending.result()
            size, sha256 = writer.close()
            self.storage.put_file(writer.path, task.tar_name)
            self.storage.put_bytes(self._stats(task, size, sha256).to_json(), task.stats_name)
        except Exception as e:  # reported to the driver, which retries the shard
            log.exception("shard %s failed", task.shard_id)
            if pending is not None and not pending.cancel():
                pending.exception()  # let a running encode finish before closing its tar
            writer.abort()
            return ShardResult(task.shard_id, ok=False, error=_one_line(e))
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        dt = time.perf_counter() - t0
        return ShardResult(task.shard_id, True, task.count, sha256, seconds=dt)

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
