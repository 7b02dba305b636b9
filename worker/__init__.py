"""Everything that turns a slide into results, in two rooms.

``fprotoseg.worker.wsi`` turns one slide file into result files (no jobs, no queue);
``fprotoseg.worker.service`` runs jobs (job store, Celery task, embedded worker, callbacks,
settings) and calls the pipeline. ``fprotoseg.worker.errors`` is the one error module of this
layer. Importing this package is cheap (no torch, no OpenSlide).
"""
