"""The networks: architectures, encoders and what builds them from a checkpoint's manifest.

Why a room of its own: inference rebuilds a network from a manifest and training optimises the
same network, so the definitions sit below both. A network imports neither the training code nor
the inference API above it; it reaches the top of ``fprotoseg.model`` only for leaves (the errors,
the registry it registers in, the config schema, the checkpoint format).
"""
