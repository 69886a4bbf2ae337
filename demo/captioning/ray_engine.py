"""``--engine ray``: the same captioning on Ray Data, one model replica per worker.

The work items become a Ray dataset; ``map_batches`` runs :class:`_Replica` (an actor class: each actor
loads the model once, on a GPU when it is given one) over blocks of ``batch_size`` videos, and each
actor runs exactly the local engine (:func:`.job.caption_items`: background decoding, batched
``generate()``). Records stream back to the driver as they are ready, which writes them through the same
:class:`.records.Store` (so the lock, the torn-line handling and resume are the local ones) and shows
progress. Ray schedules everything: there is no scheduler here.

Ray is optional: ``pip install 'vlmcompress[ray]'``. Workers on other machines need vlmcompress and the
model there too, and the videos at the same paths.
"""
from __future__ import annotations

import json
import logging
import warnings

import numpy as np

from .inputs import Item
from .job import Job, caption_items

__all__ = ["run_ray"]


class _Replica:
    """One model replica (a Ray Data actor)."""

    def __init__(self, job: Job, decode_workers: int, device: str | None):
        from .engine import Captioner, load_model

        model, processor = load_model(job.model, device=device, dtype=job.dtype)
        job.resolve_resize(processor)
        self.job = job
        self.decode_workers = decode_workers
        self.captioner = Captioner(model, processor, job.config, job.prompt, max_new_tokens=job.max_new_tokens)

    def __call__(self, batch: dict) -> dict:
        items = [Item(str(p), str(g), int(s), float(m), None if e == "" else str(e))
                 for p, g, s, m, e in zip(batch["path"], batch["given"], batch["size"], batch["mtime"], batch["error"])]
        records: list[dict] = []
        caption_items(self.job, self.captioner, items, batch_size=len(items), decode_workers=self.decode_workers,
                      emit=records.append)
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def run_ray(job: Job, items: list[Item], *, emit, should_stop, address: str | None, workers: int,
            batch_size: int, decode_workers: int, gpus_per_worker: float | None, warn) -> None:
    """Caption ``items`` on Ray and ``emit`` each record on the driver (in completion order)."""
    try:
        import ray
    except ImportError as err:
        from .engine import ModelError

        raise ModelError("--engine ray needs Ray: pip install 'vlmcompress[ray]'") from err
    from .engine import ModelError, check_device

    started = not ray.is_initialized()
    if started:
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        try:
            ray.init(**kwargs) if address is None else ray.init(address=address, **kwargs)
        except Exception as e:                   # Ray raises plain Exception / ConnectionError here
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise ModelError(f"could not start or reach {where}: {str(e).strip().splitlines()[0]}") from e
    try:
        ctx = ray.data.DataContext.get_current()
        logging.getLogger("ray.data").setLevel(logging.ERROR)   # its INFO lines would break the progress bar
        ctx.enable_progress_bars = False           # the driver shows its own bar, with tokens saved
        ctx.verbose_progress = False
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        device = "cuda" if gpus_per_worker > 0 else (job.device or "cpu")
        if gpus_per_worker == 0:
            check_device(job.device)
        # Fail fast on the driver for what would fail in every worker (bad name, image-only model).
        if job.model.startswith("tiny-random:"):
            warn(f"{job.model} has random weights: its captions are gibberish (it tests the pipeline, not a model)")
        rows = [{"path": it.path, "given": it.given, "size": it.size, "mtime": it.mtime, "error": it.error or ""}
                for it in items]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), len(rows) // batch_size or 1)))
        ds = ds.map_batches(
            _Replica, fn_constructor_kwargs={"job": job, "decode_workers": decode_workers, "device": device},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
            num_gpus=gpus_per_worker, num_cpus=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")             # Ray Data's tuning hints, printed over the progress bar
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for text in batch["record"]:
                    emit(json.loads(text))
                if should_stop():
                    break
    except ModelError:
        raise
    except Exception as e:
        # A replica that cannot start (model not found, image-only) fails every block: say why once.
        cause = getattr(e, "cause", None) or e
        msg = str(cause).strip().splitlines()
        raise ModelError(f"the Ray run failed: {type(cause).__name__}: {msg[-1] if msg else ''}") from e
    finally:
        if started:
            ray.shutdown()
