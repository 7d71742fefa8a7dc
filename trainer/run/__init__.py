"""A run's life in its output folder: one run per folder (lock), what a start may replace (overwrite last), what a
resume must keep (the settings that decide the data and batches), and what a checkpoint may contain (no code)."""
