# allot's image: both binaries, allot-api (the default command) and allot-worker.
# Built by deploy/docker-compose.yml; by hand: docker build -t allot:local .
#
# Stage 1 compiles in the official Rust image. Nothing is downloaded at build time beyond the
# crates (Swagger UI comes from a crate: utoipa-swagger-ui's `vendored` feature).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins -p allot-api -p allot-worker

# Stage 2: a slim runtime with the two binaries, curl for the healthchecks, and a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home allot
COPY --from=build /src/target/release/allot-api /src/target/release/allot-worker /usr/local/bin/
USER allot
# In a container, listen on every interface (the defaults are loopback-only).
ENV ALLOT_HTTP_ADDR=0.0.0.0:8080 \
    ALLOT_WORKER_HTTP_ADDR=0.0.0.0:8081
EXPOSE 8080 8081
CMD ["allot-api"]
