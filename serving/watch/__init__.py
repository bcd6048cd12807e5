"""The weights folder: watch it, decide what is complete and newest, and hand it to the coordinator.

* :mod:`~serving.watch.observer`: filesystem events in (watchdog), nothing else;
* :mod:`~serving.watch.entries`: what a name in the folder is — inspection, completeness, identity;
* :mod:`~serving.watch.lineage`: the live base checkpoint and the LoRA adapter merged into it;
* :mod:`~serving.watch.watcher`: :class:`WeightsWatcher`, the queue, debounce and install order.
"""

from serving.watch.entries import DEFAULT_MAX_FILES, content_hash_file, sha256_file
from serving.watch.watcher import WatchRecord, WeightsWatcher

__all__ = ["DEFAULT_MAX_FILES", "WatchRecord", "WeightsWatcher", "content_hash_file", "sha256_file"]
