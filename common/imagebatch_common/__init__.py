"""ImageBatch's shared layer: what the operator and the worker both import.

The contract between them (shard manifests, results, object keys, the environment a
Job hands a worker), the one storage adapter, the guarded HTTP client and the small
readers and helpers both sides need. It imports neither the operator nor the worker,
and nothing of Kubernetes.
"""
