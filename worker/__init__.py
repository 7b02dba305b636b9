"""Everything that turns a slide into results. Celery tasks are thin wrappers over
:func:`worker.pipeline.run`.

Importing this package is cheap (no torch, no OpenSlide) so the API can import
``worker.settings`` and ``worker.errors``.
"""
