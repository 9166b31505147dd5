# syntax=docker/dockerfile:1
# The agent's image, as the Helm chart (deploy/helm/monitor) runs it:
#   docker build -t monitor:0.1.0 .
#
# Stage `build`: the eBPF build chain of TOOLCHAIN.md (Debian's Rust with a precompiled BPF
# `core`, bpf-linker on LLVM 22), installed by `cargo xtask setup` exactly as on a developer's
# machine and in CI, then the release build, stripped of its debug info (100 MB -> ~20 MB).
# Stage `runtime` (the last, the image): Debian slim and that one binary. It needs only glibc,
# libgcc and zlib, which slim has (TLS is rustls, Kafka's librdkafka is linked in statically).
# It runs as root with the capabilities the chart grants, not privileged.

ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:1-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo run --release -p xtask -- setup \
    && cargo build --release -p monitor \
    && objcopy --strip-debug target/release/monitor /usr/local/bin/monitor

FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim AS runtime
COPY --from=build /usr/local/bin/monitor /usr/local/bin/monitor
ENTRYPOINT ["/usr/local/bin/monitor"]
# The built-in defaults: alerts on stdout, state under /var/lib/monitor, the control socket in
# /run/monitor (mount both from the host). The chart runs `agent --config /etc/monitor/agent.toml`
# with its ConfigMap mounted there.
CMD ["agent"]
