"""Worker metrics, served by the worker process itself (`start_http_server`).

A SimpleWorker runs jobs in its own process, so the default registry is complete: no multiprocess
mode is needed here. Buckets reach 10 minutes because one real face on a slow GPU, or a queue
backlog, can take that long. No job ids in labels.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# `_created` series double the series count and no dashboard of ours uses them.
disable_created_metrics()

_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600)

QUEUE_WAIT = Histogram(
    "dynface_queue_wait_seconds", "Time from submission to a worker starting the job.", buckets=_SECONDS
)
INFERENCE = Histogram(
    "dynface_inference_seconds",
    "A succeeded job's share of the pipeline time of the batch it ran in (the batch's time divided by "
    "its jobs; all of it for a job run alone).",
    buckets=_SECONDS,
)
END_TO_END = Histogram(
    "dynface_job_duration_seconds", "Submission to completion (queue wait + inference).", buckets=_SECONDS
)
STAGE = Histogram(
    "dynface_stage_seconds",
    "Pipeline stage time per photo; a stage the photos of a batch share (dblm, sample) counts each "
    "photo's share of it.",
    ["stage"],
    buckets=_SECONDS,
)
JOBS = Counter(
    "dynface_jobs_total", "Finished jobs by outcome and reason (error code, or 'ok').", ["outcome", "reason"]
)
BATCH_JOBS = Histogram(
    "dynface_jobs_per_batch",
    "Jobs whose faces one pipeline batch restored together (1 = alone; DYNFACE_WORKER_BATCH_MAX_JOBS).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
)
FACES = Histogram("dynface_faces_per_image", "Faces restored per photo.", buckets=(0, 1, 2, 4, 8, 16, 32, 64))
NFE = Histogram(
    "dynface_diffusion_steps_per_face",
    "Diffusion steps (UNet evaluations) per face.",
    buckets=(5, 10, 25, 50, 75, 100, 150, 250),
)
GPU_PEAK = Gauge(
    "dynface_gpu_peak_memory_bytes", "Peak accelerator memory allocated during the last job.", ["device"]
)
MODEL_LOAD = Gauge("dynface_model_load_seconds", "Time taken to load the pipeline at start-up.")
READY = Gauge("dynface_worker_ready", "1 once the model is loaded and the worker takes jobs.")
