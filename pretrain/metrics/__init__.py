"""What a run reports: the peak FLOP/s behind MFU (mfu), the log rows (logger) and where they go (sinks)."""
