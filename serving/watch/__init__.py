"""The weights folder: watch it, decide what is complete and newest, and hand it to the coordinator.

* :mod:`~serving.watch.observer`: filesystem events in (watchdog), nothing else;
* :mod:`~serving.watch.debounce`: which names have news, and when each is due;
* :mod:`~serving.watch.entries`: what a name in the folder is: inspection, completeness;
* :mod:`~serving.watch.gate`: whether an entry due is read now, waited for, or refused;
* :mod:`~serving.watch.install`: installing complete entries and accounting for every outcome, with
  :mod:`~serving.watch.selection` (which one: the newest, base then adapter),
  :mod:`~serving.watch.identity` (content identity, and when to hash),
  :mod:`~serving.watch.ledger` (entries refused, not read again until they change) and
  :mod:`~serving.watch.lineage` (the live base checkpoint and the LoRA adapter merged into it);
* :mod:`~serving.watch.outcome`: what became of each entry (the account a model without weights gives);
* :mod:`~serving.watch.watcher`: :class:`WeightsWatcher`, the queue and the worker tying them together.
"""

from serving.watch.entries import DEFAULT_MAX_FILES
from serving.watch.identity import content_hash_file
from serving.watch.install import WatchRecord
from serving.watch.outcome import EntryOutcome, InitialInstall
from serving.watch.watcher import WeightsWatcher

__all__ = ["DEFAULT_MAX_FILES", "EntryOutcome", "InitialInstall", "WatchRecord", "WeightsWatcher", "content_hash_file"]
