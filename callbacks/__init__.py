"""Lightning callbacks of lit-meta (installed as ``lit_meta.callbacks``).

Callbacks only read what the modules log or return; they never change training.
"""

__all__: list[str] = []
