"""Base and adapter lineage: which checkpoint is live, which LoRA adapter is merged into it.

A LoRA adapter is always merged into the pristine base weights W0 (never into an earlier merge);
a base published later removes the adapter exactly. :class:`Lineage` keeps that state for one
coordinator and turns an inspected entry into a :class:`~serving.refit.RefitReport`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from serving.errors import HotswapError
from serving.metrics import HotswapMetrics
from serving.publish.protocol import publish_key
from serving.refit import RefitCoordinator, RefitReport, StagedWeights
from serving.watch.entries import Entry, publish_time_ns
from serving.watch.identity import merged_hash
from serving.weights import CheckpointPolicy
from serving.weights.lora import merge_lora, read_adapter

log = logging.getLogger("serving.watch")


@dataclass(frozen=True)
class ActiveAdapter:
    name: str
    version: str
    content_hash: str | None


def entry_key(entry: Entry) -> tuple[int, str]:
    """The order of publication (see :func:`serving.publish.protocol.publish_key`)."""
    return publish_key(publish_time_ns(entry), entry.name)


class Lineage:
    """The live base checkpoint, the adapter merged into it, and the host copies of W0 it needs."""

    def __init__(self, coordinator: RefitCoordinator, metrics: HotswapMetrics, policy: CheckpointPolicy,
                 lora_scale: float, reject: Callable[[str, str, str], RefitReport]) -> None:
        self.coordinator = coordinator
        self.metrics = metrics
        self.policy = policy
        self.lora_scale = lora_scale
        self._reject = reject  # (version, reason, message) -> a counted, logged rejection
        self.base: StagedWeights | None = None
        self.adapter: ActiveAdapter | None = None
        self._merged: StagedWeights | None = None
        self._pristine: dict[str, torch.Tensor] = {}  # host copies of W0 for adapter-touched weights
        self._base_key: tuple[int, str] | None = None  # publish key of the live base / adapter entry
        self._adapter_key: tuple[int, str] | None = None

    def older_than_live(self, entry: Entry) -> bool:
        """Published before the live base (or, for an adapter, before the live adapter)."""
        key = entry_key(entry)
        if self._base_key is not None and key <= self._base_key:
            return True
        return entry.kind == "adapter" and self._adapter_key is not None and key <= self._adapter_key

    def install_checkpoint(self, entry: Entry) -> RefitReport:
        coord = self.coordinator
        h = entry.content_hash
        reuse: StagedWeights | None = None
        if h is not None:
            if coord.live is not None and coord.live.content_hash == h:
                reuse = coord.live  # the coordinator reports a no-op
            elif coord.previous is not None and coord.previous.content_hash == h:
                reuse = coord.previous  # a rollback published as a file: no read, no transfer
            elif self.base is not None and self.base.content_hash == h:
                reuse = self.base_weights()  # the base again while an adapter is live: back to W0
        if reuse is not None:
            staged = StagedWeights(entry.version, reuse.tensors, str(entry.path), h, file_exact=reuse.file_exact)
            report = coord.install(staged)
        else:
            # the coordinator's own read: on CUDA it streams straight into the standby slot's tensors
            report = coord.refit_from_path(entry.path, version=entry.version, content_hash=h)
        if report.outcome in ("success", "noop"):
            self._base_key = entry_key(entry)
            self._adapter_key = None
        if report.outcome == "success":
            self.base, self._pristine, self._merged, self.adapter = coord.live, {}, None, None
        elif report.outcome == "noop" and self.adapter is None and coord.live is not None:
            self.base = coord.live
        return report

    def identify(self, version: str, content_hash: str) -> None:
        """The content hash of the live checkpoint ``version``, computed after it went live."""
        live = self.coordinator.identify(version, content_hash)
        if live is not None and self.base is not None and self.base.version == version and \
                self.base.content_hash is None:
            self.base = live

    def _current_base(self) -> StagedWeights | None:
        if self.base is not None:
            return self.base
        live = self.coordinator.live
        return live if live is not None and live is not self._merged else None

    def base_weights(self) -> StagedWeights:
        """The pristine base: its own tensors, with the host copies of every weight an adapter touched.

        The coordinator may reuse the buffers of weights that no longer serve (the fast path writes
        the next checkpoint into them), so W0 of adapter-touched weights is kept as host copies,
        taken while those weights were still live and intact.
        """
        base = self.base
        assert base is not None
        return dataclasses.replace(base, tensors={**base.tensors, **self._pristine})

    def apply_adapter(self, entry: Entry) -> RefitReport:
        coord = self.coordinator
        base = self._current_base()
        if base is None:
            return self._reject(entry.version, "no_base",
                                f"{entry.path}: a LoRA adapter needs base weights to merge into and none are "
                                f"live; publish a base checkpoint, then publish the adapter again (or touch it)")
        if self.base is None:
            self.base, self._pristine = base, {}
        version = f"{base.version}+{entry.version}"
        mh = merged_hash(base.content_hash, entry.content_hash, self.lora_scale)
        live = coord.live
        if mh is not None and live is not None and live.content_hash == mh:
            report = coord.install(StagedWeights(version, live.tensors, str(entry.path), mh))  # a no-op
            self._adapter_key = entry_key(entry)
            return report
        t0 = time.perf_counter()
        try:
            adapter = read_adapter(entry.path, coord.engine.weight_specs(), self.policy, name=entry.version)
            t1 = time.perf_counter()
            for name in adapter.touched - set(self._pristine):
                # untouched so far, so live since the base was installed: intact
                self._pristine[name] = base.tensors[name].detach().to("cpu", copy=True)
            merged = merge_lora(self.base_weights().tensors, adapter, scale=self.lora_scale,
                                device=coord.engine.device)
        except HotswapError as e:
            return self._reject(entry.version, e.reason, str(e))
        t2 = time.perf_counter()
        staged = StagedWeights(version, merged, str(entry.path), mh)
        report = self._with_stages(coord.install(staged), {"read": t1 - t0, "merge": t2 - t1})
        if report.outcome in ("success", "noop"):
            self._adapter_key = entry_key(entry)
        if report.outcome == "success":
            self._merged = staged
            self.adapter = ActiveAdapter(entry.name, entry.version, entry.content_hash)
        return report

    def clear_adapter(self) -> RefitReport | None:
        """Reinstall the pristine base weights (None if no adapter is merged)."""
        if self.adapter is None or self.base is None:
            return None
        report = self.coordinator.install(self.base_weights())
        if report.outcome == "success":
            self.adapter, self._merged, self._adapter_key = None, None, None
        return report

    def _with_stages(self, report: RefitReport, stages: Mapping[str, float]) -> RefitReport:
        if report.outcome == "success":
            self.metrics.observe_stages(stages)
        return dataclasses.replace(report, stages={**stages, **report.stages})
