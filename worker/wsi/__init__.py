"""Slide -> result files: reading, tissue, tiling, inference, stitching, vectorising, writing.

Knows nothing of jobs, queues or HTTP (it never imports :mod:`fprotoseg.worker.service`), so the
CLI, the benchmarks and the job service all run the same :func:`fprotoseg.worker.wsi.pipeline.run`.
Importing this package is cheap; :mod:`~fprotoseg.worker.wsi.result_files` and
:mod:`~fprotoseg.worker.wsi.validate` are numpy-free so the API can use them.
"""
