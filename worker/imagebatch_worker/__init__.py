"""ImageBatch worker: fetch, compress and store one shard of images. No Kubernetes here."""
