# ImageBatch: one image, two entry points.
#
#   imagebatch-operator   the kopf operator (the Helm chart's Deployment runs it)
#   imagebatch-worker     one shard of a batch (the operator's Jobs run it)
#
# The builder stage installs the project and its dependencies from pyproject.toml into
# a virtualenv; the final stage is the slim Python base plus that virtualenv, run as
# the numeric non-root user 65532 (the worker pods' runAsUser). Nothing in the image
# needs to write outside /tmp, so it runs with readOnlyRootFilesystem and an emptyDir
# at /tmp. tests/unit/test_dockerfile.py runs the builder's RUN lines as written in a
# fresh virtualenv and starts both entry points, and lints this file with hadolint.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    VIRTUAL_ENV=/opt/imagebatch
WORKDIR /src
# Only what the install reads (the .dockerignore keeps everything else out).
COPY pyproject.toml README.md ./
COPY cli/ cli/
COPY common/ common/
COPY operator/ operator/
COPY worker/ worker/
# A virtualenv without pip of its own: the base image's pip installs into it, so no
# installer is left in what the final stage copies. Dependencies come as wheels; the
# project itself is built from pyproject.toml. Modules are compiled to bytecode here,
# as nothing can write them on a read-only root filesystem later.
RUN python -m venv --without-pip "$VIRTUAL_ENV" \
 && python -m pip --python "$VIRTUAL_ENV/bin/python" install --compile .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="imagebatch" \
      org.opencontainers.image.description="ImageBatch operator and worker: CSVs of product image URLs to compressed images in MinIO" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/imagebatch \
    PATH=/opt/imagebatch/bin:$PATH \
    HOME=/tmp
COPY --from=builder /opt/imagebatch /opt/imagebatch
WORKDIR /tmp
USER 65532:65532
# The chart and the operator's Jobs both set the command explicitly.
CMD ["imagebatch-operator"]
