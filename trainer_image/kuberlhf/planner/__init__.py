"""The memory planner: per-stage, per-GPU memory of a pipeline from its spec and its models' config.json
(never their weights). ``estimate`` is pure; ``shapes`` reads the configs; ``check`` turns a plan into the
preflight's problems; ``table`` prints it (``kuberlhf plan FILE``)."""
