"""Service settings, read from the environment (prefix ``DYNFACE_``; ``REDIS_URL`` is also accepted).

Every setting is documented in docs/configuration.md; keep the two in step. The API, the worker
and the CLI all read this one class so a value can never mean different things in two places.
"""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """All knobs of the API and the worker. Defaults suit one GPU box behind a reverse proxy."""

    # Inputs stay out of error messages: they hold secrets (API keys, passwords, the webhook secret).
    model_config = SettingsConfigDict(env_prefix="DYNFACE_", extra="ignore", hide_input_in_errors=True)

    # --- connections and naming
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DYNFACE_REDIS_URL", "REDIS_URL")
    )
    # Redis Sentinel (instead of REDIS_URL): the sentinels' host:port list and the monitored primary's
    # name; clients ask the sentinels for the current primary and follow failovers.
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str = "dynface"
    redis_password: SecretStr | None = None  # the primary's (Sentinel mode; with REDIS_URL it is in the URL)
    redis_sentinel_password: SecretStr | None = None
    redis_timeout_seconds: float = 2.0
    public_base_url: str | None = None
    key_prefix: str = "dynface"
    queue_name: str = "dynface"

    # --- model
    profile: str = "real"
    weights_dir: str | None = None
    dtype: str = Field(default="auto", pattern=r"^(auto|fp32|fp16|bf16)$")  # auto: fp16 on CUDA, else fp32
    max_face_batch: int = Field(default=8, ge=1)
    max_faces: int = Field(default=32, ge=1)
    offline: bool = False
    weights_retry_seconds: float = Field(default=30.0, gt=0)
    # Method tables and trained nets (docs/reproduce.md); the worker hands them to from_pretrained.
    dsst_table: str | None = None  # `dynface dsst build` JSON; unset = the shipped table
    dblm_weights: str | None = None  # `dynface train dblm` .safetensors; unset = training-free fallback
    dgsa_weights: str | None = None  # `dynface train dgsa` .safetensors; unset = training-free fallback
    # GPU fast path (models/speed.py; equivalence in docs/benchmarks.md, "GPU path").
    channels_last: bool = True
    compile: bool = False  # first jobs pay minutes of compilation; opt in per deployment
    compile_mode: str = Field(default="default", pattern=r"^(default|reduce-overhead|max-autotune)$")
    pin_memory: bool = True
    # Background super-resolution for `upscale` > 1 (models/background.py). none = Lanczos resize;
    # else a manifest name of a Real-ESRGAN file.
    background_model: str = Field(default="none", pattern=r"^(none|realesrgan_x2plus|realesrgan_x4plus)$")
    background_tile: int = Field(default=512, ge=0)  # input pixels per tile side; 0 = whole photo
    background_tile_overlap: int = Field(default=32, ge=0)
    # zlib level of PNG results: time on the worker vs bytes, never pixels (models.images.PNG_COMPRESS_LEVEL).
    png_compress_level: int = Field(default=3, ge=0, le=9)

    # --- upload limits
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=40_000_000, ge=1)
    # The result (input pixels x upscale²): worker memory, and a result's bytes must fit one Redis
    # string (512 MB; the comparison is twice the result) — docs/configuration.md.
    max_output_pixels: int = Field(default=64_000_000, ge=1)
    # Decoded uploads held at once per API process (memory: docs/scaling.md, "API memory").
    max_concurrent_image_checks: int = Field(default=4, ge=1)

    # --- queue, timeouts and retention
    max_queue_depth: int = Field(default=100, ge=1)
    # Per API key (0 = no limit; not on an open API, whose one anonymous owner is bounded by the queue
    # alone), so one client cannot fill the queue, or Redis, for the others: jobs queued or running at
    # once, and bytes its jobs hold in Redis (queued uploads and stored results).
    max_active_jobs_per_key: int = Field(default=20, ge=0)
    max_stored_bytes_per_key: int = Field(default=1024**3, ge=0)
    queue_full_retry_after_seconds: int = Field(default=30, ge=1)
    # A job queued this long fails with queue_timeout (app/queued.py) before its record can expire.
    # Unset: `queue_timeout` below (an explicit default would refuse every existing short record TTL).
    queue_timeout_seconds: int | None = Field(default=None, ge=1)
    job_timeout_seconds: int = Field(default=600, ge=1)
    result_ttl_seconds: int = Field(default=3600, ge=1)
    record_ttl_seconds: int = Field(default=24 * 3600, ge=1)
    max_retries: int = Field(default=2, ge=0)
    # Under the 60 s that reverse proxies and load balancers commonly give an upstream answer (nginx's
    # proxy_read_timeout, AWS ALB's idle timeout): a wait that runs out answers the job, not their 504.
    max_wait_seconds: int = Field(default=50, ge=0, le=60)

    # --- worker liveness
    heartbeat_interval_seconds: float = Field(default=10.0, gt=0)
    heartbeat_ttl_seconds: int = Field(default=45, ge=1)
    reaper_interval_seconds: float = Field(default=15.0, gt=0)
    worker_metrics_port: int = Field(default=9100, ge=0, le=65535)  # 0: any free port
    # Unset: every interface for `dynface worker` (Prometheus scrapes it from another container);
    # `dynface serve`'s own workers: its --host, like its API.
    worker_metrics_host: str | None = None

    # --- cross-job batching (worker/main.py `claim_riders`): a worker that takes a job also takes up
    # to max_jobs - 1 waiting jobs with the same mode and fidelity, their faces in one sampler batch.
    # 1 = off: on CPU it measured no faster (docs/benchmarks.md, "Batching"), and it makes a photo's
    # pixels depend (by float rounding) on what it was batched with.
    worker_batch_max_jobs: int = Field(default=1, ge=1)
    worker_batch_wait_seconds: float = Field(default=0.05, ge=0, le=10)  # for riders to arrive

    # --- auth and rate limiting
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    rate_limit_per_minute: int = Field(default=60, ge=0)

    # --- webhooks
    webhook_secret: SecretStr | None = None
    webhook_allow_private: bool = False
    webhook_allow_http: bool = False
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_retry_delays_seconds: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0]
    )

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value: object) -> object:
        """Accept ``DYNFACE_REDIS_SENTINELS=host1:26379,host2:26379``; each entry must be host:port."""
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        for entry in value if isinstance(value, list) else []:
            host, _, port = str(entry).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"sentinel {entry!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _one_redis(self) -> Settings:
        if self.redis_url and self.redis_sentinels:
            raise ValueError(
                "set REDIS_URL (or DYNFACE_REDIS_URL) or DYNFACE_REDIS_SENTINELS, not both; under "
                "docker compose, Sentinel mode also needs DYNFACE_REDIS_URL= (empty) in .env"
            )
        return self

    @model_validator(mode="after")
    def _records_outlive_jobs(self) -> Settings:
        # A record (and its input) must outlive every attempt of its job once started, or a running
        # job would vanish (the TTL is renewed when a worker starts it).
        longest = (self.max_retries + 1) * self.job_timeout_seconds
        if self.record_ttl_seconds <= longest:
            raise ValueError(
                f"DYNFACE_RECORD_TTL_SECONDS ({self.record_ttl_seconds}) must exceed "
                f"(max_retries + 1) x job_timeout_seconds = {longest}"
            )
        return self

    @model_validator(mode="after")
    def _results_expire_with_their_record(self) -> Settings:
        # Both TTLs restart when a job ends: results kept longer than the record could never be
        # fetched (404 `not_found` instead of the documented 410 `expired`), only take memory.
        if self.result_ttl_seconds > self.record_ttl_seconds:
            raise ValueError(
                f"DYNFACE_RESULT_TTL_SECONDS ({self.result_ttl_seconds}) must not exceed "
                f"DYNFACE_RECORD_TTL_SECONDS ({self.record_ttl_seconds}): a job's results are "
                "reachable only while its record exists"
            )
        return self

    @model_validator(mode="after")
    def _heartbeats_outpace_their_ttl(self) -> Settings:
        # A heartbeat that comes after the entry it refreshes has expired makes a live worker look
        # dead: its job is re-queued (run twice) or failed with worker_lost.
        if self.heartbeat_interval_seconds >= self.heartbeat_ttl_seconds:
            raise ValueError(
                f"DYNFACE_HEARTBEAT_INTERVAL_SECONDS ({self.heartbeat_interval_seconds:g}) must be below "
                f"DYNFACE_HEARTBEAT_TTL_SECONDS ({self.heartbeat_ttl_seconds}), or live workers are "
                "taken for dead (keep the TTL at least 3 x the interval)"
            )
        return self

    @model_validator(mode="after")
    def _queued_jobs_fail_before_they_expire(self) -> Settings:
        # A queued job's record expires record_ttl after it began to wait; the sweep that fails it
        # comes round within two reaper intervals (its lock can make one replica miss a turn).
        room = self.record_ttl_seconds - 2 * self.reaper_interval_seconds
        if room <= 0 or self.queue_timeout > room:
            unset = "unset, so " if self.queue_timeout_seconds is None else ""
            raise ValueError(
                f"DYNFACE_RECORD_TTL_SECONDS - 2 x DYNFACE_REAPER_INTERVAL_SECONDS = {room:g} must be "
                f"positive and at least DYNFACE_QUEUE_TIMEOUT_SECONDS ({unset}{self.queue_timeout:g}): a "
                "queued job must fail before its record expires"
            )
        return self

    @model_validator(mode="after")
    def _an_upload_fits_a_keys_share(self) -> Settings:
        # An upload larger than a key's share would be refused (429, "retry later") every time. Only
        # with keys: an open API has no per-key share.
        if self.auth_enabled and 0 < self.max_stored_bytes_per_key < self.max_upload_bytes:
            raise ValueError(
                f"DYNFACE_MAX_STORED_BYTES_PER_KEY ({self.max_stored_bytes_per_key}) must be 0 (no limit) "
                f"or at least DYNFACE_MAX_UPLOAD_BYTES ({self.max_upload_bytes}), or uploads in between "
                "could never be accepted"
            )
        return self

    @property
    def queue_timeout(self) -> float:
        """Seconds a job may wait in the queue: the setting, else an hour or, with a record TTL too
        short for that, as long as its record is sure to outlive the wait."""
        if self.queue_timeout_seconds is not None:
            return float(self.queue_timeout_seconds)
        return min(3600.0, self.record_ttl_seconds - 2 * self.reaper_interval_seconds)

    @property
    def redis_configured(self) -> bool:
        """Whether an external Redis is configured (else `dynface serve` embeds one)."""
        return bool(self.redis_url or self.redis_sentinels)

    @field_validator("dsst_table", "dblm_weights", "dgsa_weights", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: object) -> object:
        """``DYNFACE_DSST_TABLE=`` (an empty line in an env file) means unset, not the current folder."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """Accept ``DYNFACE_API_KEYS=k1,k2`` (what people write in env files) as well as lists."""
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _whsec_is_base64(cls, value: SecretStr | None) -> SecretStr | None:
        """A ``whsec_`` secret is base64 after the prefix; refuse a broken one at start-up, since
        signing with it would fail only later, on a delivery thread."""
        raw = value.get_secret_value().strip() if value is not None else ""  # a secret file's newline
        if raw.startswith("whsec_"):
            try:
                key = base64.b64decode(raw.removeprefix("whsec_"), validate=True)
            except binascii.Error:
                key = b""
            if not key:
                raise ValueError("DYNFACE_WEBHOOK_SECRET: after 'whsec_' must come non-empty base64")
        return value

    @field_validator("webhook_retry_delays_seconds", mode="before")
    @classmethod
    def _split_delays(cls, value: object) -> object:
        """Accept ``DYNFACE_WEBHOOK_RETRY_DELAYS_SECONDS=1,5,30``."""
        if isinstance(value, str):
            return [float(v) for v in value.split(",") if v.strip()]
        return value

    @property
    def auth_enabled(self) -> bool:
        """The API is open only when no key is configured (and /readyz says so)."""
        return bool(self.api_keys)


@lru_cache
def get_settings() -> Settings:
    """Process-wide settings, read once from the environment (tests build their own instead)."""
    return Settings()
