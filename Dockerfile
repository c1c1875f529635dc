# syntax=docker/dockerfile:1
#
# nerve-server image: a release build of the `nerve-server` binary on distroless (glibc, no shell),
# running as the distroless `nonroot` user (uid/gid 65532).
#
#   docker build -t ghcr.io/nerve-bus/nerve:0.1.0 .
#   docker run --rm -p 50051:50051 -p 8081:8081 -v nerve-data:/var/lib/nerve \
#     -e NERVE_INSECURE=true ghcr.io/nerve-bus/nerve:0.1.0
#
# Configuration is by NERVE_* environment variables or flags (`--help` lists them). The defaults here
# listen on every interface, serve plaintext grpc.health.v1 on 8081 and keep the embedded (SQLite)
# database in /var/lib/nerve; production deployments set NERVE_STORE=postgres://... and
# NERVE_STREAMS=redis://... instead. On a non-loopback address the server needs authentication (mTLS:
# NERVE_TLS__*; JWT: NERVE_AUTH__JWT__*) or an explicit NERVE_INSECURE=true, which the image does not
# set: the helm chart (helm/nerve) sets it only when asked to run without authentication.

# Rust version of the build; the crate needs 1.94 or newer (rust-version in Cargo.toml).
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build

# Dependencies first, in a layer of their own: the real manifest, lock file, build script and protos
# with placeholder sources, so this (slow) layer is rebuilt only when one of those changes.
# bench/ is a member of the workspace (a load tool, not in the image): cargo needs its manifest to load
# the workspace, and a placeholder main; its sources stay out of the build context (.dockerignore).
COPY Cargo.toml Cargo.lock build.rs ./
# .cargo/config.toml sets how the bundled SQLite is compiled (fdatasync)
COPY .cargo ./.cargo
COPY bench/Cargo.toml ./bench/Cargo.toml
COPY proto ./proto
RUN mkdir -p server/src bench/src \
 && echo 'fn main() {}' > bench/src/main.rs \
 && echo 'fn main() {}' > server/src/main.rs \
 && : > server/src/lib.rs \
 && cargo build --release --locked --bin nerve-server \
 && rm -rf server

# The server itself (server/ holds the sources and the migrations that sqlx embeds at compile time).
# touch: the copied files may be older than the placeholder build, and cargo compares timestamps.
COPY server ./server
RUN touch server/src/main.rs server/src/lib.rs \
 && cargo build --release --locked --bin nerve-server \
 && install -D -m 0755 target/release/nerve-server /out/nerve-server \
 && mkdir -p /out/data

# glibc 2.36 and libgcc_s, as on the bookworm builder; nothing else: no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="nerve" \
      org.opencontainers.image.description="Nerve: a gRPC event bus" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/nerve-server /usr/local/bin/nerve-server
# the embedded database's directory, writable by the runtime user (mount a volume here to keep it)
COPY --from=builder --chown=65532:65532 /out/data /var/lib/nerve

ENV NERVE_LISTEN=0.0.0.0:50051 \
    NERVE_HEALTH_LISTEN=0.0.0.0:8081 \
    NERVE_DATA_DIR=/var/lib/nerve

# gRPC: EventBus, Admin, grpc.health.v1 and reflection (TLS when NERVE_TLS__CERT_FILE/KEY_FILE are set)
EXPOSE 50051
# grpc.health.v1 only, always plaintext: for kubelet gRPC probes, which can do neither TLS nor credentials
EXPOSE 8081
# Prometheus /metrics, when NERVE_METRICS__LISTEN=0.0.0.0:9090 (the chart's metrics.port)
EXPOSE 9090

USER 65532:65532
WORKDIR /var/lib/nerve
# exec form: the server is PID 1 and gets SIGTERM directly (graceful shutdown, exit 0)
ENTRYPOINT ["/usr/local/bin/nerve-server"]
