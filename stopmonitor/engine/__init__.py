"""The engine's use cases, one file per step of the protocol (stop-execution.md, "The pass").

``monitor`` (:func:`~stopmonitor.engine.monitor.run_pass`), ``close`` (the three transactions of
a close, top to bottom), ``reconcile`` (invariant 7) and ``store`` (the only engine module that
touches ``api.models``). ``context`` and ``decisions`` hold what they share. Functions here
commit and reach the network: they must be called outside any transaction.
"""
