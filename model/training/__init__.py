"""Training and scoring on labelled data: datasets, loaders, the trainers, pseudo masks, stage 2,
evaluation and metrics, cross-validation and the shipped and packaged checkpoints.

Why a room of its own: none of it runs when a slide is segmented, and it brings the training-only
dependencies; the inference API at the top of ``fprotoseg.model`` never imports it.
"""
