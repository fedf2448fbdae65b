# syntax=docker/dockerfile:1
# Build: docker build -t rlsproxy .
# Run:   docker run -p 6432:6432 -e RLSPROXY_UPSTREAM=... -e RLSPROXY_COGNITO_REGION=... rlsproxy
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
# The same flags as `make build`, which CI runs. cgo: the SQL guard links
# PostgreSQL's own parser (pg_query_go); netgo and osusergo keep name
# resolution in Go, so the binary needs nothing of libc but libc itself.
RUN CGO_ENABLED=1 go build -trimpath -tags netgo,osusergo -ldflags "-s -w -X main.version=${VERSION}" -o /out/rlsproxy ./cmd/rlsproxy

# A minimal, non-root base with glibc (the binary is built on bookworm, so
# the glibc versions match): no shell, no package manager.
FROM gcr.io/distroless/base-debian12:nonroot
COPY --from=build /out/rlsproxy /usr/local/bin/rlsproxy
USER nonroot:nonroot
# In a container the listeners face the container network; TLS (--tls-cert,
# --tls-key) is required for tokens from other hosts unless
# RLSPROXY_INSECURE_PLAINTEXT=true is set for a trusted network.
ENV RLSPROXY_LISTEN=0.0.0.0:6432 \
    RLSPROXY_ADMIN_LISTEN=0.0.0.0:9187 \
    RLSPROXY_LOG_FORMAT=json
EXPOSE 6432 9187
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/rlsproxy", "health"]
ENTRYPOINT ["/usr/local/bin/rlsproxy"]
CMD ["serve"]
