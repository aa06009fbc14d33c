# pollfree in a scratch container: one static binary, nothing else.
#
#   docker build -t pollfree .
#   docker run --rm -p 3000:3000 --memory 256m pollfree
#
# Build stage: a static, stripped binary (no cgo, so no libc to bring along).
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY *.go index.html ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /pollfree .

# Run stage: scratch has no shell, no passwd file and no curl. pollfree needs
# none of them; host.user shows the uid, and /healthz is probed from outside.
FROM scratch
COPY --from=build /pollfree /pollfree
# An unprivileged uid (nobody); the port is above 1024, so no capability is needed.
USER 65534:65534
ENV PORT=3000
EXPOSE 3000
ENTRYPOINT ["/pollfree"]
