# syntax=docker/dockerfile:1.7
#
# The `dropline` binary in a minimal runtime image, running as a non-root user.
#
#   docker build -t dropline:0.1.0 .
#   docker run --rm -p 50051:50051 dropline:0.1.0                       # embedded platform
#   docker run --rm -e DROPLINE_NATS=nats://nats:4222 dropline:0.1.0    # one cluster node
#
# Configuration comes from flags (arguments after the image name replace `serve`), from
# DROPLINE_* environment variables, and from the TOML file /etc/dropline/dropline.toml
# (DROPLINE_CONFIG): the image ships services/dropline.image.toml there (listen on all
# interfaces, data in /var/lib/dropline) and the Kubernetes manifests mount theirs over it.
# No setting is put in the image's environment: it would beat the mounted file.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# protoc is vendored (protoc-bin-vendored) and mimalloc's C part needs only the gcc that the
# slim Rust image carries, so nothing else is installed.
COPY . .
# The registry and target caches outlive a build (BuildKit); the binary is copied out of
# them because cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p client --bin dropline \
 && install -D -m 0755 target/release/dropline /out/dropline \
 && mkdir -p /out/data

# distroless/cc: glibc, libgcc and CA certificates, no shell and no package manager; the
# `nonroot` tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/dropline /usr/local/bin/dropline
COPY --from=build --chown=65532:65532 /out/data /var/lib/dropline
COPY services/dropline.image.toml /etc/dropline/dropline.toml
USER 65532:65532
ENV DROPLINE_CONFIG=/etc/dropline/dropline.toml
EXPOSE 50051 8080
VOLUME ["/var/lib/dropline"]
# For plain Docker; Kubernetes uses its own gRPC probes (see k8s/ and helm/). Served over TLS,
# give the check its way in too: -e DROPLINE_SERVER=https://localhost:50051 -e DROPLINE_TLS_CA=…
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s \
    CMD ["/usr/local/bin/dropline", "health", "--service", "liveness"]
ENTRYPOINT ["/usr/local/bin/dropline"]
CMD ["serve"]
