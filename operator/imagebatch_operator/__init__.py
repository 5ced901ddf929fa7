"""ImageBatch operator: kopf handlers, pure reconcile logic, one Kubernetes adapter."""
