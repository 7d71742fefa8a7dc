"""Sequence parallelism (``--sequence_parallel_size N``): each row split across N ranks, DeepSpeed Ulysses around
attention.

One room per job: :mod:`.layout` (what a launch may do, refused before weights load), :mod:`.shard` (a batch's
contiguous sequence shard, labels shifted first), :mod:`.sampler` (the same rows for every rank of a group),
:mod:`.attention` (DeepSpeed's ``UlyssesSPAttentionHF`` switched on for training forwards only).
"""
