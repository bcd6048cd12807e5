"""Publishing versions into a weights folder: the protocol's rules, and the writer that follows them.

* :mod:`~serving.publish.protocol`: the rules as pure functions: names, versions, the order of
  publication, manifests, when an entry is complete (``docs/publish.md`` states them for users);
* :mod:`~serving.publish.writer`: the writer's side: :func:`publish` (``hotswap publish``),
  :func:`publish_tensors` and :func:`staging`.

The watcher (:mod:`serving.watch`) applies the same rules on the reading side.
"""

from serving.publish.writer import PathLike, Staged, publish, publish_tensors, staging

__all__ = ["PathLike", "Staged", "publish", "publish_tensors", "staging"]
