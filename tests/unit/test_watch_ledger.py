"""The watcher's ledger of refused entries: not read again until they change, nor when their bytes are refused ones."""

from __future__ import annotations

from serving.watch.ledger import Fingerprint, RejectedLedger, Rejection


def _fp(size: int, mtime: int = 1, mode: int = 0o100644) -> Fingerprint:
    return Fingerprint((("", size, mtime, 42, mode),))


def test_ledger_refuses_same_fingerprint_and_same_content_for_content_reasons() -> None:
    ledger = RejectedLedger()
    ledger.record(Rejection("/w/v3", _fp(10), "h1", "corrupt", "bad"))
    assert ledger.lookup("/w/v3", _fp(10)) is not None
    assert ledger.lookup("/w/v3", _fp(10, mtime=2)) is None  # touched: look again
    # ... but the bytes are those refused: refused again without a read, re-keyed to the new state
    assert ledger.lookup_hash("/w/v3", _fp(10, mtime=2), "h1") is not None
    assert ledger.lookup("/w/v3", _fp(10, mtime=2)) is not None
    assert ledger.lookup_hash("/w/v3", _fp(11), "h2") is None
    assert ledger.reasons() == {"/w/v3": "corrupt"}
    ledger.forget("/w/v3")
    assert len(ledger) == 0


def test_ledger_permission_fix_is_a_change_and_unreadable_is_not_a_content_reason() -> None:
    ledger = RejectedLedger()
    ledger.record(Rejection("/w/v3", _fp(10, mode=0o100000), None, "unreadable", "denied"))
    assert ledger.lookup("/w/v3", _fp(10, mode=0o100644)) is None  # chmod changes the fingerprint
    assert ledger.lookup_hash("/w/v3", _fp(10, mode=0o100644), "h") is None
