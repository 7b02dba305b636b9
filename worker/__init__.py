"""Everything that turns a slide into results. Celery tasks are thin wrappers over
:func:`worker.pipeline.run`.

Importing this package is cheap (no torch, no OpenSlide) so the API can import
``worker.settings`` and ``worker.errors``.
"""


def __getattr__(name: str) -> object:
    """``worker.open_slide`` (DESIGN.md section 4), imported on first use so the package stays light."""
    if name == "open_slide":
        from worker.slide import open_slide

        return open_slide
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
