"""The light contract shared by the operator, the local runner and the trainer: the RLHFPipeline spec
models and the stage contract (command, env, object-store layout). No torch here."""
