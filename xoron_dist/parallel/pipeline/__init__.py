"""Pipeline parallelism: ``partition`` (torch-free layer partitioning, shared with the planner),
``split`` (a stage = the single-rank model pruned to its modules), ``schedule`` (our 1F1B over
Megatron-core's pipeline group, one DeepSpeed engine per stage). Import the submodules by name:
this package imports nothing, so the planner stays torch-free."""
