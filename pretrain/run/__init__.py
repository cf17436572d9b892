"""Running a job on real machines: processes and the watchdog (runtime), checkpoints, the run's files (outputs), where the time went (goodput), profiles (profiling)."""
