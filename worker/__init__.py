"""Everything that turns a slide into results, in two rooms.

``fprotoseg.worker.wsi`` turns one slide file into result files (no jobs, no queue);
``fprotoseg.worker.service`` runs jobs (job store, Celery task, embedded worker, callbacks,
settings) and calls the pipeline. ``fprotoseg.worker.errors`` is the one error module of this
layer. Importing this package is cheap (no torch, no OpenSlide).
"""


def __getattr__(name: str) -> object:
    """``fprotoseg.worker.open_slide``, imported on first use so the package stays light."""
    if name == "open_slide":
        from fprotoseg.worker.wsi.slide import open_slide

        return open_slide
    raise AttributeError(f"module 'fprotoseg.worker' has no attribute {name!r}")
