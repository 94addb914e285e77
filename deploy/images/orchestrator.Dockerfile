# The orchestrator for deploy/stack.yml: the core image (Python, the project's code under /tools/lib) plus the
# orchestrator's own dependencies and the templates. Built by `python -m deploy.build`.
ARG BASE_IMAGE
ARG CORE_IMAGE
FROM ${CORE_IMAGE}
USER root
COPY wheelhouse/ /wheelhouse/
RUN /tools/venv/bin/python /wheelhouse/pip.whl/pip install --quiet --no-index --find-links /wheelhouse \
        --requirement /wheelhouse/requirements.txt \
 && rm -rf /wheelhouse
# Where the code looks for the repository's templates (and their schema): beside its package.
COPY templates/ /tools/lib/templates/
WORKDIR /data
# It answers gRPC health on its own port; Swarm needs no probe of its own for it.
HEALTHCHECK NONE
EXPOSE 50051
ENTRYPOINT ["/usr/bin/tini", "--", "/tools/venv/bin/python", "-m", "orchestrator"]
