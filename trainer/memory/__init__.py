"""Memory savers for long rows (DeepSpeed's Arctic Long Sequence Training pieces), each behind its own flag."""
