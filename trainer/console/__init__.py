"""What the user sees on the console: one error sentence, once, last; a compact log line; no library noise.

Each module has one job: ``errors`` reports a user fault through whatever launcher started the process,
``noise`` silences known-harmless library messages at their source, ``log_line`` formats training progress.
"""
