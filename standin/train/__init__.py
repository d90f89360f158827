"""Training Stand-In adapters.

- config.py: PrepareSettings and TrainConfig
- prepare.py: `standin prepare-data`, a folder of videos -> clips, references, captions, optional latents
- data.py: datasets and the deterministic sample stream
- trainer.py: `standin train` (Trainer, train)
- run_state.py, parallel.py, validation.py: run-folder checkpoints, FSDP sharding, validation videos
"""
