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
	writeTimeout      = 10 * time.Second  // for each whole answer that is not a stream (see newHTTPServer); then the connection is cut
	maxHeaderBytes    = 16 << 10          // the request line plus headers
	shutdownTimeout   = 5 * time.Second   // the whole shutdown; run returns after it anyway
	// closeGrace bounds the end of a connection being closed: a chat
	// client's last writes and the wait for its peer's close frame, together,
	// or an event stream's last write at shutdown. A stuck client costs it
	// once, well inside shutdownTimeout.
	closeGrace = time.Second
)

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
}

// parseConfig reads flags from args and falls back to $PORT for the address.
// -h prints the usage to stderr and returns flag.ErrHelp.
func parseConfig(args []string, getenv func(string) string, stderr io.Writer) (config, error) {
	var cfg config
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
	srv := newHTTPServer(app, log)
	serveErr := make(chan error, 1)
	scheme := "http"
	if cfg.tlsCert != "" {
		scheme = "https"
		go func() { serveErr <- srv.ServeTLS(ln, cfg.tlsCert, cfg.tlsKey) }()
	} else {
		go func() { serveErr <- srv.Serve(ln) }()
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
	ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	app.beginShutdown() // chat clients get 1001; event streams end
	// Shutdown waits for the requests in flight. A response that a client
	// stopped reading (the page, asked for again and again) would hold it
	// until the write timeout, past shutdownTimeout, so after closeGrace, as
	// a stuck chat client's are, the connections still busy are cut. Without
	// the cut, TestSIGTERMWithAStuckPageReaderExitsInTime exits 1 after 5 s.
	cut, cancelCut := context.WithTimeout(ctx, closeGrace)
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

// newHTTPServer configures the server field by field.
func newHTTPServer(h http.Handler, logger *slog.Logger) *http.Server {
	return &http.Server{
		Handler: h,
		// Headers must arrive promptly. No ReadTimeout, which would cut /ws and
		// /events: no route reads a body, and ServeHTTP bounds what net/http reads of one.
		ReadHeaderTimeout: readHeaderTimeout,
		// Idle keep-alive connections are closed after this long.
		IdleTimeout: idleTimeout,
		// Request line plus headers, at most.
		MaxHeaderBytes: maxHeaderBytes,
		// Every answer that is not a stream must be written within this, or its
		// connection is cut: a client that asks for the page again and again
		// and never reads would otherwise hold its connection, and the
		// answers in its send queue, for ever. Who owns the deadline:
		//  - HTTP/1: net/http sets it on the connection as each request has
		//    been read (conn.readRequest), so it bounds that one answer, and
		//    clears it once the answer is written.
		//  - A hijacked connection (/ws, and /events over HTTP/1.1) leaves
		//    net/http with its deadlines cleared (conn.hijackLocked), and they
		//    are its own from then on: a chat socket and an eventStream each
		//    set one before every write, x/net's handshake answer included.
		//  - HTTP/2: it is a timer per stream, armed as the stream opens
		//    (serverConn.newStream, in h2_bundle.go), that resets the stream
		//    when it fires, writing or not. An eventStream moves it before
		//    every write and clears it after (ResponseController.SetWriteDeadline),
		//    so the stream lives as long as it writes. The connection has none.
		// TestChatAndStreamsOutliveTheWriteTimeout holds the streams to that;
		// TestClientsThatNeverReadAreCut, the answers.
		WriteTimeout: writeTimeout,
		ErrorLog:     log.New(serverErrors{logger}, "", 0),
	}
}

// serverErrors takes net/http's own error lines into the structured log: a
// panic in a handler (net/http recovers it and logs it with its stack) at
// error level, the rest (TLS handshakes from scanners, clients hanging up
// mid-request) at debug.
type serverErrors struct{ log *slog.Logger }

func (e serverErrors) Write(p []byte) (int, error) {
	msg := strings.TrimSpace(string(p))
	level := slog.LevelDebug
	if strings.HasPrefix(msg, "http: panic serving") {
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
	chat        *hub
	stats       *broadcaster
	draining    atomic.Bool   // set once shutdown begins; /healthz then answers 503
	bodyTimeout time.Duration // bodyTimeout, changeable by tests before serving
	mux         *http.ServeMux
}

func newServer(cfg config, log *slog.Logger) *server {
	s := &server{mux: http.NewServeMux(), bodyTimeout: bodyTimeout}
	s.chat = newHub(log, cfg.maxClients, cfg.allowOrigins)
	s.stats = newBroadcaster(log, os.DirFS("/"), s.chat.online)
	s.stats.maxStreams = cfg.maxStreams
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
		http.NewResponseController(w).SetReadDeadline(time.Now().Add(s.bodyTimeout))
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
