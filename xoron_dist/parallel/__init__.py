"""Parallelism for Xoron: who the ranks are, which groups they form, and how the model is split.

- ``launcher_env``: rank / world / rendezvous from deepspeed, torchrun, srun or mpirun.
- ``device``: this rank's device, collective backend and training dtype.
- ``layout``: the layout check (and README compatibility table) run before any group exists.
- ``state``: the one owner of process groups (torch.distributed, DeepSpeed comm, Megatron-core
  ``parallel_state``) and the DeepSpeed ``mpu`` adapter.
- ``rank_logging``: rank-prefixed logging.

Submodules are imported by name; this package imports nothing so that ``layout`` stays cheap
(no torch/DeepSpeed import) for commands that only plan a run.
"""
