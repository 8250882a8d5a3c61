"""The kuberlhf operator: the RLHFPipeline CRD (generated from the spec models), pure manifest builders, a pure
reconcile function, and thin kopf handlers that apply its decisions."""

# Labels on every child the operator makes; handlers and the e2e harness find children by them.
LABEL_PIPELINE = "kuberlhf.io/pipeline"
LABEL_STAGE = "kuberlhf.io/stage"
LABEL_ATTEMPT = "kuberlhf.io/attempt"
LABEL_COMPONENT = "kuberlhf.io/component"  # "stage" (Job pods) or "chat" (serving pods)
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kuberlhf-operator"
