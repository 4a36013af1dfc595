"""Training: the loop (``loop``), what each algorithm computes per batch (``steps``), checkpoints
(``checkpoint``), the data order (``order``), logging (``metrics_log``) and export (``export``)."""
