// Pollfree serves one web page that gets live data without polling: a chat
// room over WebSocket and a live server-stats panel over Server-Sent Events,
// from one binary on one port.
//
// Endpoints:
//
//	GET /         the page, embedded in the binary
//	GET /ws       WebSocket chat (JSON text frames; see chat.go)
//	GET /events   Server-Sent Events: a stats snapshot once a second (see sse.go)
//	GET /stats    the latest stats snapshot as one JSON object
//	GET /healthz  200 "ok" while serving, 503 once shutdown has begun
//
// Usage:
//
//	pollfree [-addr :3000] [-allow-origin URL,...] [-max-clients N] [-max-streams N]
//	         [-tls-cert FILE -tls-key FILE] [-drain 0s] [-log-level info]
//
// Without -addr, the PORT environment variable picks the port (the container
// convention); without either, pollfree listens on :3000. On SIGINT or
// SIGTERM /healthz answers 503 at once; after -drain (while everything else
// still serves, so a load balancer sees the 503 and moves traffic away) it
// closes every chat connection with code 1001 and ends every event stream
// (refusing new ones), stops accepting, and exits within five seconds. A
// second SIGINT or SIGTERM stops it at once.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	_ "embed"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Server-wide limits and timeouts.
const (
	defaultPort       = "3000"            // without -addr or $PORT
	defaultMaxClients = 10_000            // concurrent chat connections; one more gets 503
	defaultMaxStreams = 10_000            // concurrent event streams; one more gets 503
	readHeaderTimeout = 5 * time.Second   // for the request line and headers (slowloris)
	bodyTimeout       = 10 * time.Second  // for what net/http reads of a request body no route wants; then the connection is cut
	idleTimeout       = 120 * time.Second // a keep-alive connection with no request in flight
	maxHeaderBytes    = 16 << 10          // the request line plus headers
	shutdownTimeout   = 5 * time.Second   // the whole shutdown; run returns after it anyway
	// writeTimeout bounds every write: each whole answer that is not a
	// stream (see newHTTPServer), each write to a chat client or an event
	// stream, and an HTTP/2 connection's wait to write anything at all.
	// Past it the client is too slow, and its connection is cut.
	writeTimeout = 10 * time.Second
	// closeGrace bounds the end of a connection being closed: a chat
	// client's last writes and the wait for its peer's close frame, together,
	// or an event stream's last write at shutdown. A stuck client costs it
	// once, well inside shutdownTimeout.
	closeGrace = time.Second
)

// timings are every duration pollfree waits for, one value made from the
// constants of the same names and passed down, so that tests can shorten
// any of them for one server.
type timings struct {
	readHeader, body, idle, write, shutdown, closeGrace time.Duration // the server's, above
	ping, readIdle, resumeWindow                        time.Duration // the chat's (pingEvery, readIdle, resumeWindow)
	sample, keepAlive                                   time.Duration // the stats stream's (sampleEvery, sseKeepAlive)
}

func defaultTimings() timings {
	return timings{
		readHeader: readHeaderTimeout, body: bodyTimeout, idle: idleTimeout, write: writeTimeout,
		shutdown: shutdownTimeout, closeGrace: closeGrace,
		ping: pingEvery, readIdle: readIdle, resumeWindow: resumeWindow,
		sample: sampleEvery, keepAlive: sseKeepAlive,
	}
}

//go:embed index.html
var page []byte

// main owns the signals. The first SIGINT or SIGTERM cancels run's ctx, and
// run drains and shuts down; a second one stops the process at once, with
// status 1, as a second Ctrl-C does.
func main() {
	ctx, cancel := context.WithCancel(context.Background())
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-signals
		cancel()
		fmt.Fprintln(os.Stderr, "pollfree: stopped at once by a second signal:", <-signals)
		os.Exit(1)
	}()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "pollfree:", err)
		os.Exit(1)
	}
}

// config is what the command line and environment decide.
type config struct {
	addr         string
	allowOrigins []string // extra origins allowed to open /ws, as "scheme://host[:port]"
	maxClients   int
	maxStreams   int
	tlsCert      string
	tlsKey       string
	drain        time.Duration // how long /healthz says 503 before shutdown proper
	logLevel     slog.Level
	timings      timings
}

// parseConfig reads flags from args and falls back to $PORT for the address.
// -h prints the usage to stderr and returns flag.ErrHelp.
func parseConfig(args []string, getenv func(string) string, stderr io.Writer) (config, error) {
	cfg := config{timings: defaultTimings()}
	fs := flag.NewFlagSet("pollfree", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&cfg.addr, "addr", "", "listen address, host:port (default \":$PORT\", or \":"+defaultPort+"\" without $PORT)")
	origins := fs.String("allow-origin", "", "comma-separated origins, besides the page's own, that may open /ws (e.g. https://example.com)")
	fs.IntVar(&cfg.maxClients, "max-clients", defaultMaxClients, "most concurrent chat connections; more get 503")
	fs.IntVar(&cfg.maxStreams, "max-streams", defaultMaxStreams, "most concurrent event streams (GET /events); more get 503")
	fs.StringVar(&cfg.tlsCert, "tls-cert", "", "certificate `file` (PEM) to serve HTTPS and HTTP/2; needs -tls-key")
	fs.StringVar(&cfg.tlsKey, "tls-key", "", "private key `file` (PEM) for -tls-cert")
	fs.DurationVar(&cfg.drain, "drain", 0, "on SIGTERM, keep serving for this `duration` with /healthz answering 503, then shut down (e.g. 5s behind a load balancer)")
	fs.TextVar(&cfg.logLevel, "log-level", slog.LevelInfo, "log `level`: debug, info, warn or error (debug logs every connection)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "pollfree serves a live chat (WebSocket) and live server stats (Server-Sent Events) on one page.\n\nUsage: pollfree [flags]\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected argument %q (see -h)", fs.Arg(0))
	}
	if cfg.addr == "" {
		port := getenv("PORT")
		if port == "" {
			port = defaultPort
		}
		cfg.addr = ":" + port
	}
	if (cfg.tlsCert == "") != (cfg.tlsKey == "") {
		return cfg, errors.New("-tls-cert and -tls-key go together")
	}
	if cfg.drain < 0 {
		return cfg, fmt.Errorf("-drain must not be negative, got %v", cfg.drain)
	}
	if cfg.maxClients < 1 {
		return cfg, fmt.Errorf("-max-clients must be at least 1, got %d", cfg.maxClients)
	}
	if cfg.maxStreams < 1 {
		return cfg, fmt.Errorf("-max-streams must be at least 1, got %d", cfg.maxStreams)
	}
	for o := range strings.SplitSeq(*origins, ",") {
		if o = strings.TrimSpace(o); o != "" {
			cfg.allowOrigins = append(cfg.allowOrigins, o)
		}
	}
	return cfg, nil
}

// run is the whole program: it parses args, listens, serves until ctx is
// done, then shuts down. main adds only signals and the exit status, so that
// tests can start the real program. It writes its log (and -h) to stderr.
func run(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	cfg, err := parseConfig(args, getenv, stderr)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: cfg.logLevel}))
	app := newServer(cfg, log)

	// Listen before logging, so the URL printed is the real one (even for port 0).
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	srv := newHTTPServer(app)
	serveErr := make(chan error, 1)
	go func() { serveErr <- serve(srv, ln, cfg.tlsCert, cfg.tlsKey) }()
	scheme := "http"
	if cfg.tlsCert != "" {
		scheme = "https"
	}
	log.Info("pollfree listening", "url", listenURL(scheme, ln.Addr()))

	select {
	case err := <-serveErr:
		return err
	case <-ctx.Done():
	}

	// Drain: /healthz says 503 while everything else still serves, so that a
	// load balancer's probe sees it and sends new traffic elsewhere.
	app.draining.Store(true)
	if cfg.drain > 0 {
		log.Info("draining", "for", cfg.drain)
		time.Sleep(cfg.drain)
	}
	// Shutdown: tell every client (chat and streams refuse newcomers from
	// then on), stop accepting, wait for them all, bounded.
	log.Info("shutting down")
	ctx, cancel := context.WithTimeout(context.Background(), cfg.timings.shutdown)
	defer cancel()
	app.beginShutdown() // chat clients get 1001; event streams end
	// Shutdown waits for the requests in flight. A response that a client
	// stopped reading (the page, asked for again and again) would hold it
	// until the write timeout, past the shutdown's bound, so after closeGrace,
	// as a stuck chat client's are, the connections still busy are cut.
	cut, cancelCut := context.WithTimeout(ctx, cfg.timings.closeGrace)
	defer cancelCut()
	if srv.Shutdown(cut) != nil {
		log.Warn("cutting responses still being written")
		srv.Close()
	}
	if err := app.wait(ctx); err != nil {
		log.Error("shutdown incomplete", "err", err)
		return err
	}
	log.Info("stopped")
	return nil
}

// HTTP/2's own limits (with -tls-cert). Each applies to one connection.
const (
	// http2MaxStreams bounds the streams a connection may have open at once,
	// whatever the route: the least RFC 9113 recommends. A connection is
	// held to it alone; -max-streams stays a bound on the whole server.
	http2MaxStreams = 100
	// http2MaxFrameBytes is the largest frame a client may send, in bytes:
	// the least HTTP/2 allows, since the reader keeps a buffer the size of
	// the largest frame it has read.
	http2MaxFrameBytes = 16 << 10
	// http2WindowBytes is what a client may send, in bytes, that the server
	// holds unread: on a connection, and on each of its streams. No route
	// reads a body. It is the least net/http takes for a connection: below
	// it, net/http silently uses 1 MiB.
	http2WindowBytes = 64 << 10
)

// newHTTPServer configures the server of s field by field.
func newHTTPServer(s *server) *http.Server {
	t := s.t
	return &http.Server{
		Handler: s,
		// Headers must arrive promptly. No ReadTimeout, which would cut /ws and
		// /events: no route reads a body, and ServeHTTP bounds what net/http reads of one.
		ReadHeaderTimeout: t.readHeader,
		// Idle keep-alive connections are closed after this long.
		IdleTimeout: t.idle,
		// Request line plus headers, at most.
		MaxHeaderBytes: maxHeaderBytes,
		// Every answer that is not a stream must be written within this, or
		// its connection is cut: a client that asks for the page again and
		// again and never reads would otherwise hold its connection, and the
		// answers in its send queue, for ever. net/http arms it as it reads a
		// request. A hijacked connection (/ws, and /events over HTTP/1.1)
		// leaves net/http without it and sets its own before each write;
		// over HTTP/2 it is a timer that resets the stream, which an event
		// stream moves on at each of its writes.
		WriteTimeout: t.write,
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams:          http2MaxStreams,
			MaxReadFrameSize:              http2MaxFrameBytes,
			MaxReceiveBufferPerConnection: http2WindowBytes,
			MaxReceiveBufferPerStream:     http2WindowBytes,
			// A connection that writes nothing for this long, its client
			// having stopped reading, is closed with all its streams. A
			// stream's own deadline cannot do it: its reset would be one more
			// frame waiting behind the stuck write. (A ping health check
			// would not either: a client can answer pings and never read.)
			WriteByteTimeout: t.write,
		},
		ErrorLog: log.New(serverErrors{s.log}, "", 0),
	}
}

// serve serves srv on ln until it stops: over TLS, offering HTTP/2 and
// HTTP/1.1, when certFile is given, through tlsBeneath.
func serve(srv *http.Server, ln net.Listener, certFile, keyFile string) error {
	if certFile == "" {
		return srv.Serve(ln)
	}
	return srv.ServeTLS(tlsBeneath{ln}, certFile, keyFile)
}

// tlsBeneath is the listener that crypto/tls reads and writes through. Its
// connections hold crypto/tls to its own rule, that after a write that timed
// out every later write fails at once, for the one write it exempts: the
// close_notify alert that closing a connection writes, under a fresh
// deadline of crypto/tls's own (5 s). Without it, every connection closed
// after a write that timed out (an HTTP/2 connection past
// WriteByteTimeout, an answer cut by WriteTimeout, a stuck chat client or
// stream) would wait that long again, past shutdown's bound.
type tlsBeneath struct{ net.Listener }

func (l tlsBeneath) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if tcp, ok := c.(*net.TCPConn); ok {
		return &stuckAfterTimeout{TCPConn: tcp}, nil
	}
	return c, err
}

// stuckAfterTimeout is a TCP connection beneath TLS: once a write to it has
// timed out, it takes no more. Only crypto/tls writes to it, through Write.
type stuckAfterTimeout struct {
	*net.TCPConn
	timedOut atomic.Bool
}

func (c *stuckAfterTimeout) Write(p []byte) (int, error) {
	if c.timedOut.Load() {
		return 0, os.ErrDeadlineExceeded
	}
	n, err := c.TCPConn.Write(p)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		c.timedOut.Store(true)
	}
	return n, err
}

// closeWithin closes conn. Over TLS, closing writes a close_notify alert
// first, under crypto/tls's own deadline (5 s): the connection beneath is
// closed at bound if the alert is not out by then, at once if bound has
// passed.
func closeWithin(conn net.Conn, bound time.Time) error {
	if tc, ok := conn.(*tls.Conn); ok {
		defer time.AfterFunc(time.Until(bound), func() { tc.NetConn().Close() }).Stop()
	}
	return conn.Close()
}

// tcpBeneath returns the TCP connection beneath conn, over TLS too (where
// a socket's kernel buffers are set), or nil for a connection of another kind.
func tcpBeneath(conn net.Conn) *net.TCPConn {
	if tc, ok := conn.(*tls.Conn); ok {
		conn = tc.NetConn()
	}
	if s, ok := conn.(*stuckAfterTimeout); ok {
		return s.TCPConn
	}
	tcp, _ := conn.(*net.TCPConn)
	return tcp
}

// serverErrors takes net/http's own error lines into the structured log: a
// panic in a handler (net/http's HTTP/1 and HTTP/2 servers each recover it
// and log it with its stack) at error level, the rest (TLS handshakes from scanners, clients hanging up
// mid-request) at debug.
type serverErrors struct{ log *slog.Logger }

func (e serverErrors) Write(p []byte) (int, error) {
	msg := strings.TrimSpace(string(p))
	level := slog.LevelDebug
	if strings.HasPrefix(msg, "http: panic serving") || strings.HasPrefix(msg, "http2: panic serving") {
		level = slog.LevelError
	}
	e.log.Log(context.Background(), level, msg)
	return len(p), nil
}

// recoverTo keeps a panic in a goroutine the server starts, outside
// net/http's own recovery, from killing the process: deferred in that
// goroutine, it logs the panic at error level with its stack, then calls
// then, if not nil, to let go of what the goroutine held. Where it stands
// among the goroutine's other deferred calls decides what then may rely on.
func recoverTo(log *slog.Logger, what string, then func()) {
	if v := recover(); v != nil {
		log.Error("panic", "in", what, "err", v, "stack", string(debug.Stack()))
		if then != nil {
			then()
		}
	}
}

// stamp formats t as every time pollfree sends is written, chat frames and
// stats snapshots alike: RFC 3339, UTC, to the millisecond.
func stamp(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000Z07:00") }

// listenURL turns a listener address into a URL a person can click:
// an unspecified host (":3000", "[::]:3000") becomes localhost.
func listenURL(scheme string, addr net.Addr) string {
	host, port, _ := net.SplitHostPort(addr.String()) // a TCP address always splits
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "localhost"
	}
	return scheme + "://" + net.JoinHostPort(host, port) + "/"
}

// server is pollfree's http.Handler: the chat hub, the stats broadcaster and
// the routes over them.
type server struct {
	log      *slog.Logger
	t        timings
	chat     *hub
	stats    *broadcaster
	draining atomic.Bool // set once shutdown begins; /healthz then answers 503
	mux      *http.ServeMux
}

func newServer(cfg config, log *slog.Logger) *server {
	s := &server{log: log, t: cfg.timings, mux: http.NewServeMux()}
	s.chat = newHub(log, cfg)
	s.stats = newBroadcaster(log, os.DirFS("/"), s.chat.online, cfg)
	s.routes()
	return s
}

// routes lists every endpoint in one place.
func (s *server) routes() {
	s.mux.HandleFunc("GET /{$}", serveIndex)
	s.mux.Handle("GET /ws", s.chat)
	s.mux.HandleFunc("GET /events", s.stats.serveEvents)
	s.mux.HandleFunc("GET /stats", s.stats.serveStats)
	s.mux.HandleFunc("GET /healthz", s.serveHealthz)
}

// ServeHTTP serves every route. No route reads a request body, and none is
// waited for: after a handler, net/http would read up to 256 KiB of an unread
// body before answering, to keep the connection, so a GET /healthz with
// Content-Length: 100000, trickled a byte a second, held its connection for
// ever. An HTTP/1 request with a body is answered at once with
// Connection: close instead, and what net/http still reads of the body as it
// closes it must come within bodyTimeout. (HTTP/2 never waits for a body.)
func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength != 0 && r.ProtoMajor == 1 {
		w.Header().Set("Connection", "close")
		http.NewResponseController(w).SetReadDeadline(time.Now().Add(s.t.body))
	}
	s.mux.ServeHTTP(w, r)
}

// beginShutdown makes /healthz fail, closes every chat connection with 1001
// and ends every event stream. It does not wait; see wait.
func (s *server) beginShutdown() {
	s.draining.Store(true)
	s.chat.shutdown()
	s.stats.shutdown()
}

// wait blocks until every chat connection and event stream has closed
// (http.Server.Shutdown does not track hijacked connections) or ctx is done,
// and names what is still open. It waits for both at once: waited for one
// after the other, the first could run out ctx, and the second, whose group
// was long done, would find both of its cases ready and might say "still
// open" (TestShutdownWaitNamesOnlyWhatIsStillOpen).
func (s *server) wait(ctx context.Context) error {
	chat := make(chan error, 1)
	go func() { chat <- s.chat.wait(ctx) }()
	streams := waitFor(ctx, &s.stats.streams, "event streams")
	return errors.Join(<-chat, streams)
}

// waitFor waits for wg, or until ctx is done. Call it before ctx is done:
// given a ctx already done, it may report a wg that is done too, as its
// select then picks either.
func waitFor(ctx context.Context, wg *sync.WaitGroup, what string) error {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%s still open: %w", what, ctx.Err())
	}
}

// pageCSP is the page's Content-Security-Policy. The page is fixed and
// embedded, so its one inline script and its one style element are allowed
// by their SHA-256 hashes, computed once at start: no other script runs and
// no other style applies (the page has no style attributes; setting
// element.style from the script is allowed). Connections go back to this
// server only; the page loads nothing from anywhere else.
var pageCSP = "default-src 'none'; script-src " + inlineHash(page, "script") + "; style-src " + inlineHash(page, "style") +
	"; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// inlineHash returns the CSP source that allows the text of the page's one
// <tag> element (written without attributes): 'sha256-' and the base64 of
// its SHA-256. A page without exactly one is a mistake in index.html, and
// pollfree does not start.
func inlineHash(page []byte, tag string) string {
	_, text, ok := bytes.Cut(page, []byte("<"+tag+">"))
	text, _, ok2 := bytes.Cut(text, []byte("</"+tag+">"))
	if n := bytes.Count(page, []byte("<"+tag)); n != 1 || !ok || !ok2 {
		panic(fmt.Sprintf("index.html must have one <%s> element, without attributes; it has %d", tag, n))
	}
	sum := sha256.Sum256(text)
	return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
}

// serveIndex serves GET /: the embedded page.
func serveIndex(w http.ResponseWriter, _ *http.Request) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(len(page)))
	h.Set("Content-Security-Policy", pageCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-cache")
	w.Write(page) // net/http drops it for HEAD, which this route answers too
}

// serveHealthz serves GET /healthz for load balancers and orchestrators.
func (s *server) serveHealthz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	if s.draining.Load() {
		http.Error(w, "shutting down", http.StatusServiceUnavailable)
		return
	}
	io.WriteString(w, "ok\n")
}
