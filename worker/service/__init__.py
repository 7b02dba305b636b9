"""The job service: job records, states, the Celery task and the embedded worker, callbacks, settings.

It drives :mod:`fprotoseg.worker.wsi` (never the other way round) and is what the API talks to:
the API imports only the light modules here (settings, states, the job store, the Celery app
configured by task name), never the pipeline.
"""
