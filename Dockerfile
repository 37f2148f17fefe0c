# syntax=docker/dockerfile:1.7
# chatkit-gate container image.
#   docker build -t chatkit-gate:0.1.0 .
# Needs BuildKit (the default builder of Docker 23+): the cache mounts below keep the
# crates.io registry and the target directory between builds, so a source-only change
# recompiles this crate and not its dependencies.

ARG RUST_VERSION=1.88

FROM rust:${RUST_VERSION}-slim-bookworm AS build
# make: jemalloc (the gate's allocator) is built from source; the slim image has gcc only.
# (Not pinned: bookworm's make is a build tool here, not part of the image that ships.)
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=chatkit-gate-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=chatkit-gate-target,target=/src/target,sharing=locked \
    cargo build --release --locked --bin chatkit-gate \
    && install -D -m 0755 target/release/chatkit-gate /out/chatkit-gate

# glibc + libgcc, CA certificates and tzdata, no shell, no package manager; runs as
# uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="chatkit-gate" \
      org.opencontainers.image.description="Reverse-proxy sidecar for OpenAI ChatKit: TLS, forward auth, Redis rate limits, session minting" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/chatkit-gate /usr/local/bin/chatkit-gate
USER 65532:65532
# 8443 HTTPS, 8080 plain-HTTP redirect, 9090 admin (/metrics, /healthz, /readyz).
EXPOSE 8443 8080 9090
ENTRYPOINT ["chatkit-gate"]
CMD ["--config", "/etc/chatkit-gate/config.toml"]
