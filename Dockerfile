# syntax=docker/dockerfile:1

# Same command and flags as "make build": a static binary without cgo.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o bin/byokproxy ./cmd/byokproxy

# The runtime image has no shell and runs as an unprivileged user. The config,
# the age identity and the admin token are mounted at run time, for example
# under /etc/byokproxy, and are never part of the image. The listeners must
# bind 0.0.0.0 (not the loopback default) to be reachable from outside.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/bin/byokproxy /byokproxy
USER nonroot:nonroot
EXPOSE 8080 8081 9090
# The image has no curl, so the binary checks its own /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
	CMD ["/byokproxy", "healthcheck", "--url", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["/byokproxy"]
CMD ["serve", "--config", "/etc/byokproxy/config.yaml"]
