"""Multi-process training: FSDP2 sharding (`trainer=fsdp`), SLURM preemption handling, sharded-checkpoint export."""
