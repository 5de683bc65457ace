# llproxy in a container: a static binary, run as an unprivileged user.
#   docker build -t llproxy .
#   docker run -p 8080:8080 -v ./config.json:/etc/llproxy/config.json:ro llproxy
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/llproxy ./cmd/llproxy

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/llproxy /usr/local/bin/llproxy
# The example config (the demo mock route works without any key); mount
# your own over it. The state file (daily budgets) goes to /var/lib/llproxy.
COPY config-example.json /etc/llproxy/config.json
USER 65532:65532
EXPOSE 8080
VOLUME ["/var/lib/llproxy"]
ENV LLPROXY_STATE_FILE=/var/lib/llproxy/llproxy-state.json
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/llproxy", "healthcheck", "-url", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["/usr/local/bin/llproxy"]
CMD ["-config", "/etc/llproxy/config.json"]
