"""Names the operator gives things, which the plugin looks them up by.

Copies of ``imagebatch_operator.plan``'s constants (the plugin does not import the
operator's planning code); a unit test keeps them equal.
"""

API_VERSION = "imagebatch.dev/v1alpha1"
KIND = "ImageBatch"
RESOURCE = "imagebatches.imagebatch.dev"
LABEL_BATCH = "imagebatch.dev/batch"
LABEL_RUN = "imagebatch.dev/run"
WORKER_CONTAINER = "worker"
# Set by the Job controller on every pod of an Indexed Job.
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
