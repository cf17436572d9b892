"""Running a trained model: load it from a checkpoint or an export (load), and sample text or images (sample)."""
