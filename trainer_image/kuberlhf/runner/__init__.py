"""The local runner: ``kuberlhf run PIPELINE.yaml`` runs a whole RLHFPipeline on one machine through the same
stage contract as the operator's Kubernetes Jobs (``kuberlhf.contract.stage``), with an embedded SeaweedFS S3
server as the object store; ``kuberlhf train`` speaks DeepSpeed-Chat's ``e2e_rlhf.py`` and builds such a pipeline.

Nothing heavy is imported here: torch/transformers load only where a command needs them.
"""
