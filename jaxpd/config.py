"""Deployment configuration: YAML in, a typed read-only config out, errors that name the key.

    model:      {checkpoint: DIR or null for the embedded default, dtype: null}
    mode:       colocated | disaggregated
    prefill:    {devices: [0, 1, 2, 3], tp: 4}
    decode:     {devices: [4, 5], tp: 2}        # disaggregated only
    kv:         {page_size: 16, num_pages: 2048}
    attention:  auto | reference | cudnn | pallas
    scheduler:  {chunk_size: 256, max_prefill_tokens: 2048, max_decode_batch: 64, prefix_caching: true}
    seed: 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jaxpd.errors import ConfigError


def _power_of_two(v: int) -> int:
    """Page and chunk sizes are shape buckets: powers of two keep compilations few."""
    if v & (v - 1):
        raise ValueError(f"must be a power of two, got {v}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    checkpoint: str | None = Field(None, description="HF or orbax folder; null = the embedded default model")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="compute dtype; null = the checkpoint's (float32 on CPU)")


class MeshSection(_Strict):
    devices: list[int] = Field(description="indices into jax.devices() this mesh uses")
    tp: int = Field(1, ge=1, description="tensor-parallel degree; must divide len(devices)")

    @field_validator("devices")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one device index")
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"device indices must be distinct and >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _tp_divides(self) -> MeshSection:
        if len(self.devices) % self.tp:
            raise ValueError(f"tp={self.tp} must divide the number of devices ({len(self.devices)})")
        if len(self.devices) != self.tp:
            raise ValueError(f"data-parallel replicas within one mesh are not supported yet: "
                             f"use exactly tp={self.tp} devices (got {len(self.devices)})")
        return self


class KVSection(_Strict):
    page_size: int = Field(16, ge=1, description="tokens per KV page (power of two)")
    num_pages: int = Field(2048, ge=2, description="pages per pool (one pool per mesh)")

    _pow2 = field_validator("page_size")(classmethod(lambda cls, v: _power_of_two(v)))


class SchedulerSection(_Strict):
    chunk_size: int = Field(256, ge=16, description="max prompt tokens per sequence per prefill step (power of two)")
    max_prefill_tokens: int = Field(2048, ge=16, description="max tokens in one prefill step")
    max_decode_batch: int = Field(64, ge=1, description="max sequences per decode step")
    prefix_caching: bool = Field(True, description="reuse cached KV blocks of shared prompt prefixes")

    _pow2 = field_validator("chunk_size")(classmethod(lambda cls, v: _power_of_two(v)))


class DeploymentConfig(_Strict):
    model: ModelSection = ModelSection()
    mode: Literal["colocated", "disaggregated"] = "colocated"
    prefill: MeshSection = MeshSection(devices=[0], tp=1)
    decode: MeshSection | None = None
    kv: KVSection = KVSection()
    attention: Literal["auto", "reference", "cudnn", "pallas"] = "auto"
    scheduler: SchedulerSection = SchedulerSection()
    seed: int = 0

    @model_validator(mode="after")
    def _mode_matches_meshes(self) -> DeploymentConfig:
        if self.mode == "disaggregated":
            if self.decode is None:
                raise ValueError("mode 'disaggregated' needs a 'decode' mesh")
            shared = set(self.prefill.devices) & set(self.decode.devices)
            if shared:
                raise ValueError(f"prefill and decode meshes share devices {sorted(shared)}")
        elif self.decode is not None:
            raise ValueError("'decode' is only used with mode: disaggregated (remove it or change mode)")
        return self

    def engine_options(self):
        from jaxpd.engine.builder import EngineOptions

        decode = self.decode or self.prefill
        return EngineOptions(
            mode=self.mode, prefill_devices=tuple(self.prefill.devices), prefill_tp=self.prefill.tp,
            decode_devices=tuple(decode.devices), decode_tp=decode.tp, page_size=self.kv.page_size,
            num_pages=self.kv.num_pages, attention=self.attention,
            chunk_size=self.scheduler.chunk_size, max_prefill_tokens=self.scheduler.max_prefill_tokens,
            max_decode_batch=self.scheduler.max_decode_batch,
            prefix_caching=self.scheduler.prefix_caching, seed=self.seed)


def _format(e: ValidationError, where: str) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and indentation)"
        lines.append(f"{where}: {key}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict | None, where: str = "<config>") -> DeploymentConfig:
    try:
        return DeploymentConfig.model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(_format(e, where)) from None


def load_config(path: str | Path) -> DeploymentConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_config(data, str(path))
