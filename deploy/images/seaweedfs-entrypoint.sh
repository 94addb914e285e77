#!/bin/sh
# Runs `weed` with the container's arguments and, beside it, makes each bucket named in $S3_BUCKETS once the server
# answers (the orchestrators refuse to start without theirs); a bucket that exists already is left as it is.
set -eu
make_buckets() {
    for bucket in ${S3_BUCKETS:-}; do
        # `weed shell` waits for its master for ever: bounded here, tried again until the server is up.
        until answer=$(echo "s3.bucket.create -name $bucket" | timeout 10 weed shell 2>&1) \
            || case $answer in *"already exists"*) true ;; *) false ;; esac; do
            sleep 1
        done
        echo "seaweedfs-entrypoint: bucket $bucket is there"
    done
}
make_buckets &
exec /usr/local/bin/weed "$@"
