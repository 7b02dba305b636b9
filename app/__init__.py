"""HTTP edge and CLI. Never imports torch: tasks go to workers by name."""
